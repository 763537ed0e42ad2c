"""Quantized checkpoints on a tiny random model with the bundled tokenizer: ringlet's own directory round-trips,
AutoGPTQ/AutoAWQ directories load into Int4Weight, bad metadata is a clear error; --quant at load."""
import json

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from ringlet.checkpoint import Checkpoint, load_checkpoint
from ringlet.config import ModelConfig
from ringlet.engine import Engine, EngineConfig
from ringlet.errors import CheckpointError, ConfigError
from ringlet.model import random_weights
from ringlet.quant import get_method
from ringlet.quant.apply import quantize_weights, uniform_plan
from ringlet.quant.checkpoint import hf_config, save_quantized
from ringlet.quant.pipeline import QuantizedModel

TOKENS = list(range(100, 140))


@pytest.fixture(scope="module")
def tiny(checkpoint):
    config = ModelConfig(vocab_size=checkpoint.config.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=128, max_seq_len=256, tie_embeddings=True, name="tiny")
    return Checkpoint(config, random_weights(config, torch.float32, torch.device("cpu")), checkpoint.tokenizer, "tiny")


def _logits(ckpt_or_weights, tiny):
    ckpt = ckpt_or_weights if isinstance(ckpt_or_weights, Checkpoint) else \
        Checkpoint(tiny.config, ckpt_or_weights, tiny.tokenizer, "x")
    return Engine(ckpt, EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=64, cuda_graphs=False)
                  ).score(TOKENS)


@pytest.mark.parametrize("spec", ["rtn-int8", "rtn-int4:group_size=32,sym=false,embeddings=int8", "bitnet",
                                  "bitnet:group_size=32"])
def test_ringlet_checkpoint_round_trips(tiny, tmp_path, spec):
    from ringlet.quant import parse_method
    weights, rows = quantize_weights(tiny.weights, tiny.config, uniform_plan(tiny.config, parse_method(spec)))
    qm = QuantizedModel(weights, rows, parse_method(spec).to_dict(), {"perplexity_after": 1.0}, {"sha256": "x"})
    save_quantized(qm, tiny, tmp_path)
    loaded = load_checkpoint(tmp_path)
    name = "layers.1.feed_forward.w13"
    assert type(loaded.weights[name]).__name__ == type(weights[name]).__name__
    assert torch.allclose(_logits(loaded, tiny), _logits(weights, tiny), atol=1e-4)
    meta = _metadata(tmp_path)
    int8_embeddings = "embeddings=int8" in spec
    assert type(loaded.weights["tok_embeddings.weight"]).__name__ == ("Int8Weight" if int8_embeddings else "Tensor")
    assert meta["method"]["method"] == parse_method(spec).name and len(meta["plan"]) == 8 + int8_embeddings


def test_metadata_that_disagrees_with_tensors_names_file_and_tensor(tiny, tmp_path):
    weights, rows = quantize_weights(tiny.weights, tiny.config, uniform_plan(tiny.config, get_method("rtn-int8")))
    save_quantized(QuantizedModel(weights, rows, {"method": "rtn-int8"}, {}, {}), tiny, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    meta = _metadata(tmp_path)
    meta["plan"][0]["shape"] = [1, 1]
    save_file(tensors, str(path), metadata={"ringlet": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'layers.0.attention.wqkv'"):
        load_checkpoint(tmp_path)
    meta["plan"][0]["shape"] = [128, 64]
    del tensors[meta["plan"][0]["tensors"][0]]
    save_file(tensors, str(path), metadata={"ringlet": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="listed in the metadata plan is not in the file"):
        load_checkpoint(tmp_path)


def _metadata(directory):
    """The 'ringlet' JSON entry of a quantized directory's safetensors header."""
    with safetensors.safe_open(str(directory / "model.safetensors"), "pt") as f:
        return json.loads(f.metadata()["ringlet"])


def _hf_names(i):
    return {"attention.wq.weight": "self_attn.q_proj", "attention.wk.weight": "self_attn.k_proj",
            "attention.wv.weight": "self_attn.v_proj", "attention.wo.weight": "self_attn.o_proj",
            "feed_forward.w1.weight": "mlp.gate_proj", "feed_forward.w3.weight": "mlp.up_proj",
            "feed_forward.w2.weight": "mlp.down_proj"}


@pytest.mark.parametrize("kind", ["gptq", "awq"])
def test_autogptq_and_autoawq_directories_load(tiny, tmp_path, kind):
    from ringlet.kernels.quant_gemm import Int4Weight
    from ringlet.quant import grids
    tensors, reference = {}, dict(tiny.weights)
    for i in range(tiny.config.n_layers):
        for ours, theirs in _hf_names(i).items():
            w = tiny.weights[f"layers.{i}.{ours}"]
            p = grids.int4_params(w, 32, sym=False)
            q = Int4Weight.from_codes(grids.int4_quant(w, p), p.scales.half(), p.zeros.half(), 32)
            reference[f"layers.{i}.{ours}"] = q.dequantize()
            for key, t in (q.to_gptq() if kind == "gptq" else q.to_awq()).items():
                tensors[f"model.layers.{i}.{theirs}.{key}"] = t.contiguous()
        for ours, theirs in (("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            tensors[f"model.layers.{i}.{theirs}.weight"] = tiny.weights[f"layers.{i}.{ours}.weight"]
    tensors["model.embed_tokens.weight"] = tiny.weights["tok_embeddings.weight"]
    tensors["model.norm.weight"] = tiny.weights["norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = hf_config(tiny.config)
    config["quantization_config"] = {"quant_method": kind, "bits": 4, "group_size": 32, "sym": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text(tiny.tokenizer.backend.to_str())
    loaded = load_checkpoint(tmp_path)
    assert isinstance(loaded.weights["layers.0.attention.wqkv"], tuple)
    assert torch.allclose(_logits(loaded, tiny), _logits(reference, tiny), atol=1e-4)
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.qzeros"):
        load_checkpoint(tmp_path)


def test_quant_at_load_and_calibrated_methods_refused(tiny):
    engine = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=64, quant="rtn-int8"))
    assert type(engine.model.layers[0].wqkv).__name__ == "Int8Weight"
    assert torch.allclose(engine.score(TOKENS), _logits(tiny, tiny), atol=0.05)
    with pytest.raises(ConfigError, match="needs calibration"):
        Engine(tiny, EngineConfig(device="cpu", kv_cache_tokens=64, quant="gptq"))


def test_quantize_cli_gptq_on_the_bundled_model_then_load_it(tmp_path, checkpoint):
    """End to end: `python -m ringlet quantize --method gptq` (few calibration tokens, to stay quick) writes a
    directory that LLM(DIR) loads with no calibration, with the measured quality in its metadata."""
    import subprocess
    import sys

    from ringlet import LLM, SamplingParams
    out = tmp_path / "gptq"
    run = subprocess.run([sys.executable, "-m", "ringlet", "quantize", "--method", "gptq", "--out", str(out),
                          "--calib-tokens", "256", "--eval-tokens", "128"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = json.loads(run.stdout)
    assert printed["method"]["method"] == "gptq" and printed["perplexity_after"] > printed["perplexity_before"]
    assert printed["size_bytes"] < 0.5 * printed["reference_size_bytes"] + 60e6  # int4 projections, bf16 embedding
    meta = _metadata(out)
    assert meta["calibration"]["calibration_tokens"] == 256 and len(meta["calibration"]["sha256"]) == 64
    assert {row["group_size"] for row in meta["plan"]} == {64, 128}  # K=576 projections fall back to group 64
    llm = LLM(str(out), device="cpu", kv_cache_tokens=256)
    assert type(llm.engine.model.layers[0].w13).__name__ == "Int4Weight"
    text = llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0.0))[0].text
    assert len(text) > 0
