"""Quantizers on synthetic layers: each returns its reconstruction error, and the bounds the methods promise hold."""
import gc
import weakref

import pytest
import torch

from ringlet.errors import ConfigError
from ringlet.quant import get_method, parse_method
from ringlet.quant.awq import search_scale
from ringlet.quant.calibration import LinearStats, StatsCollector


def _layer(n=80, k=256, tokens=1024, seed=0):
    """A weight [n, k] and correlated calibration inputs with a few loud channels (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = (torch.randn(tokens, k, generator=g) @ mix) * (1 + 9 * (torch.rand(k, generator=g) < 0.05))
    collector = StatsCollector()
    collector("l", x)
    return w, collector.stats()["l"]


def test_rtn_int8_relative_error_below_one_percent():
    w, _ = _layer()
    res = get_method("rtn-int8").quantize(w)
    assert res.error < 0.01
    assert torch.allclose(res.weight.dequantize(), w, atol=w.abs().max().item() / 127)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 128])
def test_gptq_beats_rtn_on_the_same_calibration(sym, group):
    w, stats = _layer()
    rtn = get_method("rtn-int4", group_size=group, sym=sym).quantize(w, stats)
    gptq = get_method("gptq", group_size=group, sym=sym).quantize(w, stats)
    assert gptq.error < 0.9 * rtn.error, (gptq.error, rtn.error)
    assert 0 < rtn.error < 0.2


def test_gptq_int8_beats_rtn_int8_on_the_same_calibration():
    w, stats = _layer()
    rtn = get_method("rtn-int8").quantize(w, stats)
    gptq = get_method("gptq", bits=8).quantize(w, stats)
    assert type(gptq.weight).__name__ == "Int8Weight" and gptq.error < 0.9 * rtn.error, (gptq.error, rtn.error)
    assert (gptq.weight.dequantize() - w).abs().max() < 4 * w.abs().amax(1, keepdim=True).max() / 127


def test_gptq_act_order_keeps_the_original_column_order():
    w, stats = _layer(n=16, k=64)
    res = get_method("gptq", group_size=32, act_order=True).quantize(w, stats)
    assert (res.weight.dequantize() - w).abs().max() < w.abs().max() / 3


def _gptq_reference(w, h, group, sym, act_order, percdamp=0.01, block=128):
    """Algorithm 1 of Frantar et al. as the authors' gptq.py runs it, onto grids.int4_params's grid."""
    from ringlet.quant import grids
    w, h, k = w.clone(), h.clone().double(), w.shape[1]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.zeros_like(w)
    for b0 in range(0, k, block):
        w1, err1 = w[:, b0:b0 + block].clone(), torch.zeros(w.shape[0], block)
        for i in range(block):
            if (b0 + i) % group == 0:
                p = grids.int4_params(w[:, b0 + i:b0 + i + group], group, sym)
                s, z = p.scales[:, 0], 8 if sym else p.zeros[:, 0]
            q[:, b0 + i] = (torch.clamp(torch.round(w1[:, i] / s) + z, 0, 15) - z) * s
            err1[:, i] = (w1[:, i] - q[:, b0 + i]) / hinv[b0 + i, b0 + i]
            w1[:, i:] -= err1[:, i:i + 1] * hinv[b0 + i, b0 + i:b0 + block][None, :]
        w[:, b0 + block:] -= err1 @ hinv[b0:b0 + block, b0 + block:]
    return q[:, torch.argsort(perm)]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_matches_the_reference_loop(sym, act_order):
    """Group = block, so the reference's group parameters (taken before the block's own updates) coincide."""
    w, stats = _layer(n=32, k=384)
    res = get_method("gptq", group_size=128, sym=sym, act_order=act_order).quantize(w, stats)
    assert torch.equal(res.weight.dequantize(), _gptq_reference(w, stats.hessian, 128, sym, act_order))


def test_awq_output_error_not_above_rtn():
    w, stats = _layer()
    s = search_scale(w, stats, 128, False, 20)
    awq = get_method("awq", group_size=128).quantize(w * s, LinearStats(stats.hessian / s[:, None] / s[None, :],
                                                                        stats.act_mean / s, stats.tokens))
    rtn = get_method("rtn-int4", group_size=128, sym=False).quantize(w, stats)
    assert awq.error <= rtn.error + 1e-9
    assert (awq.weight.dequantize() / s - w).abs().max() < w.abs().max()


def test_bitnet_absmean_codes_are_ternary():
    w, _ = _layer(n=8, k=64)
    res = get_method("bitnet").quantize(w)
    values = torch.unique(res.weight.dequantize())
    assert len(values) == 3 and 0.3 < res.error < 0.8  # post-training ternary loses a lot: reported, not hidden


@pytest.mark.parametrize("spec, needle", [
    ("nope", "unknown quantization method 'nope'"),
    ("rtn-int4:group_size=96", "group_size=96"),
    ("gptq:bits=3", "bits=3"),
    ("rtn-int8:embeddings=int4", "embeddings='int4'"),
    ("rtn-int4:sym=maybe", "sym"),
    ("rtn-int8:group_size=32", "no option(s) group_size"),
    ("mixed:low=awq", "low='awq'"),
    ("auto:candidates=gptq;nope", "nope"),
])
def test_bad_method_options_are_clear(spec, needle):
    with pytest.raises(ConfigError, match=None) as e:
        parse_method(spec)
    assert needle in str(e.value)


def test_int4_group_falls_back_when_k_is_not_a_multiple():
    w, stats = _layer(n=8, k=576)
    assert get_method("rtn-int4", group_size=128).quantize(w, stats).group_size == 64


@pytest.fixture(scope="module")
def tiny_ctx(checkpoint):
    """A QuantContext over a tiny random model (bundled tokenizer), 64 calibration and 64 held-out tokens."""
    from ringlet.checkpoint import Checkpoint
    from ringlet.config import ModelConfig
    from ringlet.model import random_weights
    from ringlet.quant.calibration import load_calibration_text
    from ringlet.quant.pipeline import QuantContext
    config = ModelConfig(vocab_size=checkpoint.config.vocab_size, dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                         ffn_dim=128, max_seq_len=256, tie_embeddings=True, name="tiny")
    tiny = Checkpoint(config, random_weights(config, torch.float32, torch.device("cpu")), checkpoint.tokenizer, "tiny")
    return QuantContext(tiny, load_calibration_text(), calib_tokens=64, eval_tokens=64, context=32)


@pytest.mark.parametrize("budget", [0.0, 10.0])
def test_mixed_meets_its_budget_by_promoting_sensitive_layers(tiny_ctx, budget):
    run = tiny_ctx.run(parse_method(f"mixed:low=bitnet,high=bf16,budget={budget},probe_tokens=32"))
    ref = tiny_ctx.baseline()
    assert run.loss - ref.loss <= budget + 1e-9 and run.report["budget_met"]
    assert len(run.report["sensitivity"]) == 3
    promoted = run.report["promoted_layers"]
    assert (promoted == []) if budget == 10.0 else run.size > tiny_ctx.run(get_method("bitnet")).size
    kinds = {row.name: row.method for row in run.plan}
    assert all(kinds[f"layers.{i}.feed_forward.w2"] == ("dense" if i in promoted else "bitnet") for i in range(3))


def test_auto_picks_the_smallest_plan_within_budget_and_prints_its_table(tiny_ctx, capsys):
    specs = "rtn-int8;rtn-int4:group_size=32;rtn-int8:embeddings=int8;bitnet"
    for budget in (10.0, 0.0):  # 0.0: whatever lost nothing on this random model, else the dense reference
        run = tiny_ctx.run(parse_method(f"auto:budget={budget},candidates={specs}"))
        table = run.report["candidates"]
        assert [row["method"] for row in table][1:] == specs.split(";")
        within = [row for row in table[1:] if row["relative_change"] <= budget]
        expected = min(within, key=lambda row: row["size_bytes"])["method"] if within else "bf16 (reference)"
        assert run.report["chosen"] == expected and run.report["budget_met"] == bool(within)
        assert "<- chosen" in capsys.readouterr().err
    big = tiny_ctx.run(parse_method(f"auto:budget=10.0,candidates={specs}"))
    assert big.report["chosen"] == "rtn-int8:embeddings=int8"  # the tiny model is mostly its 49152 x 64 embedding
    assert type(big.weights["tok_embeddings.weight"]).__name__ == "Int8Weight"


def test_auto_frees_each_candidate_once_a_smaller_one_is_within_budget(tiny_ctx):
    """Only the best candidate so far stays alive while auto quantizes the next one, and the context keeps no
    weights at all (the bundled model's context grew by about 200 MB a candidate when it kept them)."""
    from ringlet.quant.pipeline import QuantContext
    ctx = QuantContext(tiny_ctx.checkpoint, tiny_ctx.text, calib_tokens=64, eval_tokens=64, context=32)
    models, alive_before = [], []
    quantize = ctx.quantize

    def tracked(plan):
        gc.collect()
        alive_before.append(sum(ref() is not None for ref in models))
        weights, rows = quantize(plan)
        models.append(weakref.ref(weights["layers.0.feed_forward.w2"]))
        return weights, rows

    ctx.quantize = tracked
    # rtn-int8 is rejected (larger than rtn-int4) just before rtn-int8:embeddings=int8, the smallest, is quantized
    run = ctx.run(parse_method("auto:budget=10.0,candidates=rtn-int4:group_size=32;rtn-int8;"
                               "rtn-int8:embeddings=int8;bitnet"))
    assert run.report["chosen"] == "rtn-int8:embeddings=int8"
    assert alive_before == [0, 1, 1, 1]
    del run
    gc.collect()
    assert all(ref() is None for ref in models)
