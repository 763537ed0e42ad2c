"""RoPE scaling: the linear, NTK and YaRN (and llama3) tables against formulas written out here in float64 and
against transformers' rope init functions; parsing; loaders reading checkpoint scaling; context limits."""
import math
from pathlib import Path

import pytest
import torch

from ringlet.config import ModelConfig, RopeScaling, parse_rope_scaling
from ringlet.engine import Engine, EngineConfig
from ringlet.errors import ConfigError, RequestError
from ringlet.gguf_loader import config_from_gguf
from ringlet.hf_loader import config_from_hf
from ringlet.kernels.rope import rope_cos_sin, rope_inv_freq

THETA, DH, ORIGINAL = 10000.0, 64, 2048


def _plain(dh=DH, theta=THETA):
    return theta ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)


def _scaling(kind, factor=4.0, **kw):
    return RopeScaling(type=kind, factor=factor, original_max_position=ORIGINAL, **kw)


def _close(ours: torch.Tensor, expected: torch.Tensor):
    # float32 powers of theta: a few ulps of relative error.
    torch.testing.assert_close(ours.double(), expected.double(), rtol=4e-7 * 8, atol=0)


def test_unscaled_table_is_unchanged():
    inv, att = rope_inv_freq(DH, THETA)
    assert att == 1.0
    _close(inv, _plain())
    pos = torch.arange(300, dtype=torch.float64)[:, None]
    expected = torch.cat([(pos * _plain()).cos(), (pos * _plain()).sin()], -1)
    torch.testing.assert_close(rope_cos_sin(300, DH, THETA, "cpu").double(), expected, atol=2e-4, rtol=0)


def test_linear_divides_every_frequency():
    inv, att = rope_inv_freq(DH, THETA, _scaling("linear"))
    _close(inv, _plain() / 4)
    assert att == 1.0


def test_ntk_scales_theta_and_interpolates_only_the_lowest_frequency_fully():
    inv, att = rope_inv_freq(DH, THETA, _scaling("ntk"))
    _close(inv, _plain(theta=THETA * 4 ** (DH / (DH - 2))))
    ratio = _plain() / inv.double()
    assert ratio[0] == 1.0 and math.isclose(ratio[-1], 4.0, rel_tol=1e-6)  # highest kept, lowest / factor
    assert torch.all(ratio[1:] > ratio[:-1])
    assert att == 1.0


def _yarn_float64(factor, original, beta_fast=32.0, beta_slow=1.0, dh=DH, theta=THETA):
    """YaRN's inverse frequencies as in the authors' code (jquesnelle/yarn): a ramp over dimension pairs between
    the pair that turns beta_fast times over the original context and the one that turns beta_slow times."""
    def pair_turning(n):  # solve original / (2 pi theta^(2i/dh)) = n for i
        return dh * math.log(original / (n * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(pair_turning(beta_fast)), 0), min(math.ceil(pair_turning(beta_slow)), dh - 1)
    ramp = ((torch.arange(dh // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return _plain(dh, theta) * (1 - ramp) + _plain(dh, theta) / factor * ramp


@pytest.mark.parametrize("factor, beta_fast, beta_slow", [(4.0, 32.0, 1.0), (2.5, 16.0, 2.0)])
def test_yarn_ramps_between_kept_and_interpolated_frequencies(factor, beta_fast, beta_slow):
    inv, att = rope_inv_freq(DH, THETA, _scaling("yarn", factor, beta_fast=beta_fast, beta_slow=beta_slow))
    expected = _yarn_float64(factor, ORIGINAL, beta_fast, beta_slow)
    torch.testing.assert_close(inv.double(), expected, rtol=1e-5, atol=0)
    # Pairs kept exactly turn more than beta_fast times over the original context; pairs divided by the full
    # factor turn fewer than beta_slow times; between them the ratio grows monotonically.
    ratio = _plain() / inv.double()
    turns = ORIGINAL * _plain() / (2 * math.pi)
    kept, full = ratio < 1 + 1e-6, ratio > factor * (1 - 1e-6)
    assert kept.any() and full.any()
    assert torch.all(turns[kept] > beta_fast) and torch.all(turns[full] < beta_slow)
    assert torch.all(ratio[1:] >= ratio[:-1] - 1e-6)
    assert math.isclose(att, 0.1 * math.log(factor) + 1)  # YaRN's sqrt(1/t)


def test_yarn_attention_factor_is_folded_into_cos_and_sin():
    s = _scaling("yarn")
    inv, att = rope_inv_freq(DH, THETA, s)
    table = rope_cos_sin(100, DH, THETA, "cpu", s)
    angles = torch.arange(100, dtype=torch.float32)[:, None] * inv
    torch.testing.assert_close(table, torch.cat([angles.cos(), angles.sin()], -1) * att)
    assert table[:, :DH // 2].pow(2).add(table[:, DH // 2:].pow(2)).sqrt().sub(att).abs().max() < 1e-5


def test_llama3_bands():
    s = RopeScaling(type="llama3", factor=8.0, original_max_position=8192, low_freq_factor=1.0,
                    high_freq_factor=4.0)
    inv, _ = rope_inv_freq(128, 500000.0, s)
    plain = _plain(128, 500000.0)
    wavelen = 2 * math.pi / plain
    short, long_ = wavelen < 8192 / 4, wavelen > 8192 / 1
    torch.testing.assert_close(inv.double()[short], plain[short], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv.double()[long_], plain[long_] / 8, rtol=1e-6, atol=0)


# -- against transformers ---------------------------------------------------------------------------------------

def _hf(kind, params, max_pos=8192, seq_len=None):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = transformers.LlamaConfig(hidden_size=DH * 4, num_attention_heads=4, head_dim=DH,
                                      max_position_embeddings=max_pos,
                                      rope_parameters={"rope_type": kind, "rope_theta": THETA, **params})
    kw = {"seq_len": seq_len} if seq_len is not None else {}
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", **kw)


@pytest.mark.parametrize("kind, ours, params", [
    ("linear", _scaling("linear", 4.0), {"factor": 4.0}),
    ("yarn", _scaling("yarn", 4.0), {"factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    ("yarn", _scaling("yarn", 8.0, beta_fast=16.0, beta_slow=2.0),
     {"factor": 8.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16.0, "beta_slow": 2.0}),
    ("llama3", _scaling("llama3", 8.0),
     {"factor": 8.0, "original_max_position_embeddings": ORIGINAL, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
])
def test_matches_transformers(kind, ours, params):
    inv_hf, att_hf = _hf(kind, params)
    inv, att = rope_inv_freq(DH, THETA, ours)
    torch.testing.assert_close(inv, inv_hf.float(), rtol=1e-6, atol=0)
    assert math.isclose(att, att_hf)


def test_ntk_equals_transformers_dynamic_ntk_where_their_factors_meet():
    # HF's dynamic NTK recomputes theta for the current length L: theta * (f L / L0 - (f - 1)) ** (d / (d - 2)),
    # which is ringlet's static NTK (theta * f ** (d / (d - 2))) where f L / L0 - (f - 1) = f: L = L0 (2 - 1 / f).
    inv_hf, _ = _hf("dynamic", {"factor": 4.0}, max_pos=ORIGINAL, seq_len=ORIGINAL * 7 // 4)
    inv, _ = rope_inv_freq(DH, THETA, _scaling("ntk", 4.0))
    torch.testing.assert_close(inv, inv_hf.float(), rtol=1e-6, atol=0)


# -- parsing ----------------------------------------------------------------------------------------------------

def test_parse_rope_scaling():
    assert parse_rope_scaling("none", 8192) is None
    s = parse_rope_scaling("yarn:4", 8192)
    assert (s.type, s.factor, s.original_max_position, s.max_context) == ("yarn", 4.0, 8192, 32768)
    s = parse_rope_scaling(" linear:2.5,original=4096 ", 8192)
    assert (s.type, s.factor, s.original_max_position, s.max_context) == ("linear", 2.5, 4096, 10240)
    s = parse_rope_scaling("yarn:8,beta_fast=16,beta_slow=2", 2048)
    assert (s.beta_fast, s.beta_slow) == (16.0, 2.0)
    assert parse_rope_scaling(s.spec(), 2048).factor == 8.0


@pytest.mark.parametrize("spec, needle", [
    ("yarn", "TYPE:FACTOR"), ("cubic:4", "TYPE:FACTOR"), ("yarn:four", "'four' is not a number"),
    ("ntk:0.5", "factor must be >= 1"), ("yarn:4,alpha=1", "'alpha=1'"), ("yarn:4,original=1.5", "original='1.5'"),
    ("yarn:4,beta_fast=0.5", "beta_fast > beta_slow"), ("linear:4,original=0", "original_max_position"),
])
def test_parse_errors_name_the_piece(spec, needle):
    with pytest.raises(ConfigError, match=re_escape(needle)) as e:
        parse_rope_scaling(spec, 8192)
    assert repr(spec) in str(e.value)


def re_escape(text):
    import re
    return re.escape(text)


# -- loaders ----------------------------------------------------------------------------------------------------

HF_BASE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
           "max_position_embeddings": 4096, "rope_theta": 10000.0}


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_hf_config_reads_rope_scaling(key):
    path = Path("m/config.json")
    c = config_from_hf({**HF_BASE, key: {"rope_type": "linear", "factor": 2.0}}, path)
    assert c.rope_scaling == RopeScaling("linear", 2.0, 4096) and c.max_context == 8192
    c = config_from_hf({**HF_BASE, "max_position_embeddings": 32768, key: {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "beta_fast": 32, "beta_slow": 1}},
        path)
    assert c.rope_scaling == RopeScaling("yarn", 4.0, 8192) and c.max_context == 32768
    c = config_from_hf({**HF_BASE, key: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 4096}}, path)
    assert c.rope_scaling.type == "llama3" and c.max_context == 32768
    assert config_from_hf({**HF_BASE, key: {"rope_type": "default"}}, path).rope_scaling is None
    with pytest.raises(ConfigError, match=r"rope_type 'dynamic' is not supported.*ntk"):
        config_from_hf({**HF_BASE, key: {"rope_type": "dynamic", "factor": 2.0}}, path)
    with pytest.raises(ConfigError, match=r"config\.json: .*factor must be >= 1"):
        config_from_hf({**HF_BASE, key: {"rope_type": "linear", "factor": 0.5}}, path)


GGUF_BASE = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 4096,
             "llama.embedding_length": 256, "llama.feed_forward_length": 512, "llama.attention.head_count": 4,
             "llama.attention.head_count_kv": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5,
             "llama.vocab_size": 300}


def test_gguf_metadata_reads_rope_scaling():
    path = Path("m.gguf")
    c = config_from_gguf({**GGUF_BASE, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                          "llama.rope.scaling.original_context_length": 2048}, path, {"output.weight"})
    assert c.rope_scaling == RopeScaling("yarn", 4.0, 2048) and c.max_context == 8192
    c = config_from_gguf({**GGUF_BASE, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
                         path, {"output.weight"})
    assert c.rope_scaling == RopeScaling("linear", 2.0, 4096)
    assert config_from_gguf({**GGUF_BASE, "llama.rope.scaling.type": "none"}, path, set()).rope_scaling is None
    with pytest.raises(ConfigError, match=r"m\.gguf: llama\.rope\.scaling\.type='longrope'"):
        config_from_gguf({**GGUF_BASE, "llama.rope.scaling.type": "longrope"}, path, set())


# -- the engine's context limit ---------------------------------------------------------------------------------

def test_context_beyond_rope_is_refused_naming_both_numbers(checkpoint):
    assert checkpoint.config.max_seq_len == 8192
    with pytest.raises(ConfigError, match=r"max_model_len 16384 .*trained context 8192.*rope"):
        Engine(checkpoint, EngineConfig(device="cpu", max_model_len=16384))
    with pytest.raises(ConfigError, match=r"max_model_len 40000 .* 32768 .*yarn:4.*4 x trained context 8192"):
        Engine(checkpoint, EngineConfig(device="cpu", rope_scaling="yarn:4", max_model_len=40000))
    with pytest.raises(ConfigError, match=r"rope scaling 'yarn:x'"):
        Engine(checkpoint, EngineConfig(device="cpu", rope_scaling="yarn:x"))


def test_rope_scaling_raises_the_usable_context(checkpoint):
    engine = Engine(checkpoint, EngineConfig(device="cpu", rope_scaling="linear:2", kv_cache_tokens=16384))
    assert engine.max_model_len == 16384 and engine.model.cos_sin.shape[0] == 16384
    assert engine.info()["rope_scaling"] == "linear:2"
    expected = rope_cos_sin(16384, 64, checkpoint.config.rope_theta, "cpu", RopeScaling("linear", 2.0, 8192))
    assert torch.equal(engine.model.cos_sin, expected)
    # Linear scaling by 2: position 2p of the scaled table is position p of the plain one.
    plain = rope_cos_sin(8192, 64, checkpoint.config.rope_theta, "cpu")
    torch.testing.assert_close(engine.model.cos_sin[::2][:4096], plain[:4096], atol=1e-3, rtol=0)


def test_a_tiny_model_runs_past_its_trained_context_under_yarn():
    from ringlet.checkpoint import Checkpoint
    from ringlet.model import random_weights
    from ringlet.sampling_params import SamplingParams
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    ckpt = Checkpoint(cfg, random_weights(cfg, torch.float32, torch.device("cpu")), None, "random")
    with pytest.raises(ConfigError, match="max_model_len 200 exceeds the model's trained context 64"):
        Engine(ckpt, EngineConfig(device="cpu", max_model_len=200))
    engine = Engine(ckpt, EngineConfig(device="cpu", rope_scaling="yarn:4", attention="local:32",
                                       kv_cache_tokens=512))
    assert engine.max_model_len == 256
    rid = engine.add_request(list(range(1, 97)) * 2, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    out = engine.pop_finished(rid)
    assert len(out.token_ids) == 40  # positions 192..231, past the trained 64
    with pytest.raises(RequestError, match="context holds 256"):
        engine.add_request([1] * 256, SamplingParams(max_tokens=1))


def test_model_config_stays_hashable():
    a = ModelConfig.from_name("llama-7b", rope_scaling=RopeScaling("yarn", 4.0, 4096))
    b = ModelConfig.from_name("llama-7b", rope_scaling=RopeScaling("yarn", 4.0, 4096))
    assert hash(a) == hash(b) and a == b and a.max_context == 16384
    assert a.with_rope_scaling(None).max_context == 4096
