"""Checkpoint loading: the bundled GGUF, HF directories written from it, a tiny GGUF written here, and every kind
of broken file, each of which must raise CheckpointError/ConfigError naming the file (and tensor or key).

Real files only. The Q/K row permutation is checked three ways: llama.cpp's permutation undone exactly, attention
scores of llama.cpp's interleaved RoPE on the raw GGUF rows equal to rotate-half RoPE on the loaded rows, and the
loaded tensors equal to the ones transformers' GGUF loader produces.
"""
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from ringlet.checkpoint import Checkpoint, default_model_path, load_checkpoint, weight_shapes
from ringlet.config import ModelConfig
from ringlet.errors import CheckpointError, ConfigError
from ringlet.gguf_loader import gguf_name, unpermute_rope_rows
from ringlet.hf_loader import hf_name

TEXTS = ["The capital of France is", "naïve café — 日本語 🙂", "def f(x):\n    return x  # 12  345",
         "<|im_start|>user\nhi<|im_end|>\n"]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved-pair rows (any row payload,
    so it also permutes rows of quantized bytes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def smol() -> Checkpoint:
    return load_checkpoint("default")


@pytest.fixture(scope="session")
def smol_bytes() -> bytes:
    return default_model_path().read_bytes()


def write_hf_dir(directory: Path, ckpt: Checkpoint, shards: int = 1, config_overrides: dict | None = None,
                 drop: tuple[str, ...] = ()) -> Path:
    """Write `ckpt` as an HF Llama directory: config.json, safetensors (sharded with an index when shards > 1),
    tokenizer.json, tokenizer_config.json and generation_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    c = ckpt.config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
              "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
              "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_eps,
              "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len, "vocab_size": c.vocab_size,
              "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "rope_scaling": None,
              "attention_bias": False, "mlp_bias": False, "bos_token_id": ckpt.tokenizer.bos_id,
              "eos_token_id": ckpt.tokenizer.eos_id, **(config_overrides or {})}
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {hf_name(n): t.contiguous() for n, t in ckpt.weights.items() if hf_name(n) not in drop}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(directory / file))
            weight_map.update(dict.fromkeys(part, file))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tok = ckpt.tokenizer
    tok.backend.save(str(directory / "tokenizer.json"))
    tok_config = {"bos_token": tok.backend.id_to_token(tok.bos_id), "eos_token": tok.backend.id_to_token(tok.eos_id),
                  "add_bos_token": tok.add_bos, "chat_template": tok.chat_template}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id]}))
    return directory


# A tiny untied Llama written as a GGUF here, one tensor type per role so every dequantizer path and the Q/K
# un-permutation run on known values. Rows are 256 long so K-quant blocks fit.
TINY = ModelConfig(vocab_size=300, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, rms_eps=1e-6,
                   rope_theta=10000.0, max_seq_len=128, tie_embeddings=False)
TINY_TYPES = {"tok_embeddings": Q.Q8_0, "wq": Q.Q4_K, "wk": Q.Q6_K, "wv": Q.Q5_0, "wo": Q.Q4_1, "w1": Q.Q8_0,
              "w3": Q.BF16, "w2": Q.F16, "norm": Q.F32, "output": Q.Q4_0}


def _tiny_bytes(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, Q]:
    """(stored payload in HF row order, its GGUF type) for one tiny-model tensor."""
    role = next((r for r in TINY_TYPES if f".{r}." in f".{name}" or name.startswith(r)), "norm")
    qtype = TINY_TYPES[role]
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32), Q.F32
    if qtype in (Q.Q4_K, Q.Q6_K):
        # gguf-py cannot quantize K-quants, so write random blocks with sane fp16 scales.
        block_bytes = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
        blocks = rng.integers(0, 256, size=(shape[0], shape[1] // 256, block_bytes), dtype=np.uint8)
        if qtype == Q.Q4_K:
            blocks[..., 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
            blocks[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
        else:
            blocks[..., 192:208] = rng.integers(-8, 8, size=(shape[0], shape[1] // 256, 16)).astype(np.int8).view(np.uint8)
            blocks[..., 208:210] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
        return blocks.reshape(shape[0], -1), qtype
    values = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16), qtype
    return gguf.quants.quantize(values, qtype), qtype


def write_tiny_gguf(path: Path, drop: tuple[str, ...] = (), metadata: dict | None = None,
                    arch: str = "llama") -> dict[str, torch.Tensor]:
    """Write the tiny model; return the float32 weights (ringlet names, HF layout) loading must reproduce."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    kv = {"block_count": TINY.n_layers, "context_length": TINY.max_seq_len, "embedding_length": TINY.dim,
          "feed_forward_length": TINY.ffn_dim, "attention.head_count": TINY.n_heads,
          "attention.head_count_kv": TINY.n_kv_heads, "attention.layer_norm_rms_epsilon": TINY.rms_eps}
    kv = {f"{arch}.{key}": value for key, value in kv.items()}  # no rope.freq_base: the default 10000 applies
    kv.update(metadata or {})
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [f"\u2581{a}{b}" for a in "abc" for b in "abcdefghijklmnopqrstuvwxyz"][:TINY.vocab_size - 259 - len(pieces)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    expected = {}
    for name, shape in weight_shapes(TINY).items():
        payload, qtype = _tiny_bytes(name, shape, rng)
        expected[name] = torch.from_numpy(gguf.quants.dequantize(payload, qtype).reshape(shape).copy())
        stored = payload
        if name.endswith("wq.weight"):
            stored = llama_cpp_permute(payload, TINY.n_heads)
        elif name.endswith("wk.weight"):
            stored = llama_cpp_permute(payload, TINY.n_kv_heads)
        if gguf_name(name) in drop:
            continue
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(stored),
                          raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny) -> Checkpoint:
    return load_checkpoint(tiny[0])


# ------------------------------------------------------------------------------------- the bundled model

def test_default_model_config(smol):
    expected = ModelConfig.from_name("smollm2-135m")
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "rms_eps",
                  "rope_theta", "max_seq_len", "tie_embeddings"):
        assert getattr(smol.config, field) == getattr(expected, field), field
    assert smol.source == str(default_model_path())


def test_default_model_weights_follow_the_contract(smol):
    shapes = weight_shapes(smol.config)
    assert "output.weight" not in shapes  # tied
    assert list(smol.weights) == list(shapes)
    for name, tensor in smol.weights.items():
        assert tuple(tensor.shape) == shapes[name], name
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous(), name
    assert len(smol.weights) == 2 + 9 * 30


def test_load_in_bfloat16(tiny, tiny_ckpt):
    bf16 = load_checkpoint(tiny[0], dtype=torch.bfloat16)
    for name, tensor in bf16.weights.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, tiny_ckpt.weights[name].to(torch.bfloat16)), name
    with pytest.raises(ConfigError, match="dtype"):
        load_checkpoint(tiny[0], dtype=torch.int8)


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_heads, head_dim, dim in ((9, 64, 576), (3, 64, 576), (4, 2, 5), (1, 128, 8)):
        w = rng.standard_normal((n_heads * head_dim, dim)).astype(np.float32)
        assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, n_heads), n_heads), w)
        if head_dim > 2:
            assert not np.array_equal(llama_cpp_permute(w, n_heads), w)


def _rope(x: torch.Tensor, theta: float, interleaved: bool) -> torch.Tensor:
    """RoPE on x [tokens, heads, head_dim] at positions 0..tokens-1; interleaved pairs (2j, 2j+1) as llama.cpp,
    or rotate-half pairs (j, j + head_dim/2) as HF and ringlet."""
    d = x.shape[-1]
    angles = torch.arange(x.shape[0], dtype=x.dtype)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], -1).flatten(-2) if interleaved else torch.cat([ra, rb], -1)


def _attention_scores(wq, wk, x, config, interleaved):
    t, hd = x.shape[0], config.head_dim
    q = _rope((x @ wq.T).view(t, config.n_heads, hd), config.rope_theta, interleaved)
    k = _rope((x @ wk.T).view(t, config.n_kv_heads, hd), config.rope_theta, interleaved)
    k = k.repeat_interleave(config.n_heads // config.n_kv_heads, dim=1)
    return torch.einsum("thd,shd->hts", q, k)


def test_loaded_qk_rows_give_llama_cpp_attention_scores_with_rotate_half_rope(smol):
    """What the permutation is for: llama.cpp applies interleaved RoPE to the raw GGUF rows; ringlet applies
    rotate-half RoPE to the loaded rows. The attention scores must agree (and differ without the un-permute)."""
    reader = gguf.GGUFReader(default_model_path())
    raw = {t.name: t for t in reader.tensors}
    x = torch.randn(7, smol.config.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for layer in (0, 29):
        gguf_q, gguf_k = (torch.from_numpy(gguf.quants.dequantize(raw[f"blk.{layer}.attn_{n}.weight"].data,
                                                                  raw[f"blk.{layer}.attn_{n}.weight"].tensor_type))
                          .double() for n in ("q", "k"))
        wq = smol.weights[f"layers.{layer}.attention.wq.weight"].double()
        wk = smol.weights[f"layers.{layer}.attention.wk.weight"].double()
        llama_cpp = _attention_scores(gguf_q, gguf_k, x, smol.config, interleaved=True)
        ours = _attention_scores(wq, wk, x, smol.config, interleaved=False)
        torch.testing.assert_close(ours, llama_cpp, rtol=1e-9, atol=1e-9)
        wrong = _attention_scores(gguf_q, gguf_k, x, smol.config, interleaved=False)
        assert (wrong - llama_cpp).abs().max() > 1e-2


def test_weights_equal_transformers_gguf_loader(smol):
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity tests")
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    theirs = model.state_dict()
    for name, tensor in smol.weights.items():
        assert torch.equal(theirs[hf_name(name)], tensor), name
    assert torch.equal(theirs["lm_head.weight"], smol.weights["tok_embeddings.weight"])  # tied


# ------------------------------------------------------------------------------------------ the tiny GGUF

def test_tiny_gguf_every_tensor_type_and_untied_output(tiny, tiny_ckpt):
    _, expected = tiny
    assert tiny_ckpt.config == TINY
    assert tiny_ckpt.config.tie_embeddings is False and "output.weight" in tiny_ckpt.weights
    assert list(tiny_ckpt.weights) == list(expected)
    for name, tensor in tiny_ckpt.weights.items():
        assert torch.equal(tensor, expected[name]), name  # Q/K rows permuted on write, restored on load
    tok = tiny_ckpt.tokenizer
    assert tok.add_bos and tok.encode("abc")[0] == 1 and tok.decode(tok.encode("abc de")) == "abc de"


def test_gguf_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"missing\.gguf: tensor 'blk\.1\.ffn_up\.weight' is missing"):
        load_checkpoint(path)


def test_gguf_metadata_disagrees_with_tensor_shapes(tmp_path):
    path = tmp_path / "shapes.gguf"
    write_tiny_gguf(path, metadata={"llama.feed_forward_length": 500})
    with pytest.raises(CheckpointError, match=r"shapes\.gguf: tensor 'blk\.0\.ffn_gate\.weight' has shape "
                                              r"\[512, 256\], but the config .* needs \[500, 256\]"):
        load_checkpoint(path)


def test_gguf_unknown_architecture_and_unsupported_options(tmp_path):
    path = tmp_path / "arch.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(CheckpointError, match=r"arch\.gguf: GGUF architecture 'gpt2'"):
        load_checkpoint(path)
    path = tmp_path / "scaling.gguf"
    write_tiny_gguf(path, metadata={"llama.rope.scaling.type": "longrope"})
    with pytest.raises(ConfigError, match=r"scaling\.gguf: llama\.rope\.scaling\.type='longrope'"):
        load_checkpoint(path)
    path = tmp_path / "extra.gguf"
    write_tiny_gguf(path, metadata={"llama.expert_count": 8})
    with pytest.raises(ConfigError, match=r"extra\.gguf: llama\.expert_count=8"):
        load_checkpoint(path)


def test_truncated_and_corrupted_gguf(tmp_path, smol_bytes):
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    cases = {"first-1000-bytes": smol_bytes[:1000], "half": smol_bytes[:len(smol_bytes) // 2],
             "last-byte-missing": smol_bytes[:-1], "empty": b"", "bad-magic": b"GGUX" + smol_bytes[4:]}
    for label, data in cases.items():
        path = tmp_path / f"{label}-{name}"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{label}-SmolLM2-135M-Instruct\.Q4_1\.gguf: not a valid GGUF"):
            load_checkpoint(path)
        path.unlink()


def test_gguf_corrupted_tensor_data_is_caught_by_name(tmp_path, tiny):
    data = bytearray(tiny[0].read_bytes())
    reader = gguf.GGUFReader(tiny[0])
    norm = next(t for t in reader.tensors if t.name == "blk.1.attn_norm.weight")
    data[norm.data_offset:norm.data_offset + 4] = np.float32(np.nan).tobytes()
    path = tmp_path / "nan.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"nan\.gguf: tensor 'blk\.1\.attn_norm\.weight' contains NaN"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------- HF directories

@pytest.fixture(scope="session")
def smol_hf_dir(tmp_path_factory, smol) -> Path:
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "smollm2", smol, shards=2)


def test_hf_dir_written_from_gguf_loads_the_same(smol, smol_hf_dir):
    hf = load_checkpoint(smol_hf_dir)
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "rms_eps",
                  "rope_theta", "max_seq_len", "tie_embeddings"):
        assert getattr(hf.config, field) == getattr(smol.config, field), field
    assert list(hf.weights) == list(smol.weights)
    for name, tensor in smol.weights.items():
        assert torch.equal(hf.weights[name], tensor), name
    a, b = hf.tokenizer, smol.tokenizer
    assert (a.bos_id, a.eos_id, a.eos_ids, a.add_bos, a.vocab_size) == (b.bos_id, b.eos_id, b.eos_ids, b.add_bos,
                                                                         b.vocab_size)
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert a.apply_chat_template(messages) == b.apply_chat_template(messages)


def test_hf_dir_single_file_untied_with_chat_template_file(tmp_path, tiny_ckpt):
    directory = write_hf_dir(tmp_path / "tiny", tiny_ckpt)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    ckpt = load_checkpoint(directory)
    assert ckpt.config == TINY and ckpt.source == str(directory)
    for name, tensor in tiny_ckpt.weights.items():
        assert torch.equal(ckpt.weights[name], tensor), name
    assert ckpt.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
    assert ckpt.tokenizer.add_bos is True


def test_hf_config_disagrees_with_tensor_shapes(tmp_path, tiny_ckpt):
    directory = write_hf_dir(tmp_path / "d", tiny_ckpt, config_overrides={"intermediate_size": 500})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' "
                                              r"has shape \[512, 256\], but the config .* needs \[500, 256\]"):
        load_checkpoint(directory)


def test_hf_missing_tensor(tmp_path, tiny_ckpt):
    directory = write_hf_dir(tmp_path / "d", tiny_ckpt, shards=2, drop=("model.layers.1.self_attn.k_proj.weight",))
    with pytest.raises(CheckpointError, match=r"d: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' is missing"):
        load_checkpoint(directory)


def test_hf_unsupported_config_values(tmp_path, tiny_ckpt):
    cases = {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "hidden_act": "gelu",
             "attention_bias": True, "mlp_bias": True, "rope_parameters": {"rope_type": "longrope", "factor": 4.0},
             "sliding_window": 64}
    for key, value in cases.items():
        directory = write_hf_dir(tmp_path / key, tiny_ckpt, config_overrides={key: value})
        with pytest.raises(ConfigError, match=rf"{key}[/\\]config\.json: {key}="):
            load_checkpoint(directory)
    # GPTQ, AWQ and ringlet's own quantized directories load (tests/test_quant_checkpoint.py); others are refused.
    directory = write_hf_dir(tmp_path / "bnb", tiny_ckpt,
                             config_overrides={"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(ConfigError, match=r"bnb[/\\]config\.json: quantization_config\.quant_method='bitsandbytes'"):
        load_checkpoint(directory)
    directory = write_hf_dir(tmp_path / "v5", tiny_ckpt, config_overrides={
        "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert load_checkpoint(directory).config.rope_theta == 5e5
    directory = write_hf_dir(tmp_path / "gemma", tiny_ckpt, config_overrides={"architectures": ["GemmaForCausalLM"]})
    with pytest.raises(CheckpointError, match=r"gemma[/\\]config\.json: architectures=\['GemmaForCausalLM'\]"):
        load_checkpoint(directory)
    directory = write_hf_dir(tmp_path / "notint", tiny_ckpt, config_overrides={"hidden_size": "256"})
    with pytest.raises(CheckpointError, match=r"notint[/\\]config\.json: hidden_size='256'"):
        load_checkpoint(directory)


def test_hf_truncated_and_corrupted_safetensors(tmp_path, tiny_ckpt):
    directory = write_hf_dir(tmp_path / "d", tiny_ckpt)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cases = {"truncated-data": data[:len(data) // 2], "truncated-header": data[:8 + header_len // 2],
             "tiny": data[:5], "bad-json": data[:8] + b"!" + data[9:]}
    for broken in cases.values():
        weights.write_bytes(broken)
        with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
            load_checkpoint(directory)


def test_hf_bad_tensor_contents(tmp_path, tiny_ckpt):
    directory = write_hf_dir(tmp_path / "nan", tiny_ckpt)
    tensors = {hf_name(n): t.clone() for n, t in tiny_ckpt.weights.items()}
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' contains NaN"):
        load_checkpoint(directory)
    arrays = {hf_name(n): t.numpy() for n, t in tiny_ckpt.weights.items()}
    arrays["model.norm.weight"] = arrays["model.norm.weight"].astype(np.int32)
    save_numpy(arrays, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has dtype I32"):
        load_checkpoint(directory)
    arrays["model.norm.weight"] = tiny_ckpt.weights["norm.weight"].numpy()
    arrays["model.layers.0.self_attn.q_proj.qweight"] = np.zeros((4, 4), np.int32)
    save_numpy(arrays, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensors the model would not use: 'model\.layers\.0\.self_attn"):
        load_checkpoint(directory)


def test_hf_index_names_a_missing_shard(tmp_path, tiny_ckpt):
    directory = write_hf_dir(tmp_path / "d", tiny_ckpt, shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: lists model-00002-of-00002"):
        load_checkpoint(directory)


def test_hf_tokenizer_files(tmp_path, tiny_ckpt):
    directory = write_hf_dir(tmp_path / "d", tiny_ckpt)
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_checkpoint(directory)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"d: no tokenizer\.json"):
        load_checkpoint(directory)
    write_hf_dir(directory, tiny_ckpt)
    (directory / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"config\.json: not readable JSON"):
        load_checkpoint(directory)


# ------------------------------------------------------------------------------------------- bad paths

def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.gguf: no such file or directory; expected a \.gguf"):
        load_checkpoint(tmp_path / "nowhere.gguf")
    with pytest.raises(CheckpointError, match=r"empty: directory has no config\.json"):
        (tmp_path / "empty").mkdir()
        load_checkpoint(tmp_path / "empty")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a checkpoint ringlet reads; expected"):
        load_checkpoint(text)


def test_pickle_checkpoints_are_refused(tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                                                       "intermediate_size": 8, "num_hidden_layers": 1,
                                                       "num_attention_heads": 2, "vocab_size": 10}))
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    shutil.copy(directory / "pytorch_model.bin", tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"pickled: weights only as pickle files \(pytorch_model\.bin\)"):
        load_checkpoint(directory)
    with pytest.raises(CheckpointError, match=r"model\.pt: pickle checkpoints are never loaded"):
        load_checkpoint(tmp_path / "model.pt")


def test_default_model_path_points_at_the_bundled_gguf():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
