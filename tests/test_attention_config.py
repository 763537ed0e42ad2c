"""Attention pattern strings and the bundled model under sparse patterns.

Parsing: every form of `--attention` and every kind of bad piece. On the model: local:64 equals dense while the
whole text fits in the window; under local:16, strided and block-sparse patterns (and per-layer overrides) the
engine's log-probabilities and greedy tokens equal a float64 Llama written here with an explicit mask per layer and
head, from the checkpoint's weights."""
import math

import pytest
import torch

from ringlet import LLM, SamplingParams
from ringlet.attention import check_attention_spec, format_attention, parse_attention, parse_pattern, pattern_spec
from ringlet.engine import Engine, EngineConfig
from ringlet.errors import ConfigError
from ringlet.kernels.patterns import DENSE, BlockSparse, Local, Strided

N_LAYERS = 30  # the bundled model's


# -- parsing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("dense", DENSE),
    ("local:256", Local(256)),
    (" local: 1 ", Local(1)),
    ("strided:64,256", Strided(stride=64, window=256)),
    ("local:256,sink=4", Local(256, sink=4)),
    ("strided:64,256, sink = 4", Strided(stride=64, window=256, sink=4)),
    ("block:16,local=4,stride=8", BlockSparse(16, 4, 8)),
    ("block", BlockSparse()),
    ("block:16", BlockSparse()),
    ("block:stride=2,local=1", BlockSparse(16, 1, 2)),
])
def test_single_patterns(spec, expected):
    patterns = parse_attention(spec, N_LAYERS)
    assert patterns == [expected] * N_LAYERS
    assert parse_pattern(pattern_spec(expected)) == expected


def test_per_layer_overrides_count_from_both_ends():
    patterns = parse_attention("local:256;0=dense;-1=dense;5=block:16,local=2,stride=4", N_LAYERS)
    assert patterns[0] == DENSE and patterns[N_LAYERS - 1] == DENSE
    assert patterns[5] == BlockSparse(16, 2, 4)
    assert all(p == Local(256) for i, p in enumerate(patterns) if i not in (0, 5, N_LAYERS - 1))
    spec = format_attention(patterns)
    assert spec == "local:256;0=dense;5=block:16,local=2,stride=4;29=dense"
    assert parse_attention(spec, N_LAYERS) == patterns
    assert parse_attention("dense;-30=local:8", N_LAYERS)[0] == Local(8)


BAD_SPECS = [
    ("sparse", "'sparse' is not a pattern"),
    ("local", "'local' is not a pattern"),
    ("dense:4", "'dense:4' is not a pattern"),
    ("local:", "window '' is not an integer"),
    ("local:x", "window 'x' is not an integer"),
    ("local:0", "window must be an int >= 1"),
    ("local:-3", "window must be an int >= 1"),
    ("strided:1,256", "stride must be an int >= 2"),
    ("strided:64", "strided:STRIDE,WINDOW"),
    ("strided:64,0", "window must be an int >= 1"),
    ("local:256,sink=-1", "sink must be an int >= 0"),
    ("local:256,sinks=4", "'sinks=4' must be sink=N"),
    ("local:256,4", "local:WINDOW[,sink=N]"),
    ("strided:64,256,sink=x", "sink 'x' is not an integer"),
    ("block:32,local=4,stride=8", "block size 32 not supported"),
    ("block:16,local=0", "local_blocks must be an int >= 1"),
    ("block:16,width=3", "'width=3'"),
    ("block:16,local=2,local=3", "'local=3'"),
    ("local:256;30=dense", "layer 30 in '30=dense' is out of range for a model of 30 layers"),
    ("local:256;-31=dense", "layer -31"),
    ("local:256;0=dense;-30=local:8", "both set layer 0"),
    ("0=dense", "starts with a layer override"),
    ("local:256;dense", "override 'dense' is not LAYER=PATTERN"),
    ("local:256;x=dense", "override 'x=dense'"),
    ("local:256;1=locl:8", "'locl:8' is not a pattern"),
]


@pytest.mark.parametrize("spec, needle", BAD_SPECS)
def test_bad_specs_name_the_piece(spec, needle):
    with pytest.raises(ConfigError) as e:
        parse_attention(spec, N_LAYERS)
    assert needle in str(e.value) and repr(spec) in str(e.value), str(e.value)


# The bad specs that only the model's layer count (30) makes bad.
LAYER_COUNT_SPECS = {"local:256;30=dense", "local:256;-31=dense", "local:256;0=dense;-30=local:8"}


@pytest.mark.parametrize("spec, needle", BAD_SPECS)
def test_check_attention_spec_leaves_only_layer_counts_to_the_model(spec, needle):
    """check_attention_spec (what runs before a model loads) refuses every bad spec parse_attention refuses, with
    the same message, except the two checks that need the model's layer count."""
    if spec in LAYER_COUNT_SPECS:
        check_attention_spec(spec)
        return
    with pytest.raises(ConfigError) as e:
        check_attention_spec(spec)
    assert needle in str(e.value), str(e.value)


def test_api_refuses_a_bad_pattern_before_loading_the_model():
    # The model path does not exist: only a check made before loading can name the pattern.
    with pytest.raises(ConfigError, match=r"attention 'local:0'.*window"):
        LLM("/no/such/model.gguf", device="cpu", attention="local:0")
    with pytest.raises(ConfigError, match="attention must be a pattern string"):
        LLM("/no/such/model.gguf", device="cpu", attention=256)


# -- the bundled model under patterns ---------------------------------------------------------------------------

def reference_logprobs(checkpoint, ids: list[int], patterns) -> torch.Tensor:
    """Log-softmax [len(ids), vocab] of a float64 Llama over the checkpoint's weights, layer i attending under
    patterns[i].mask (per query head); no paging, no kernels."""
    c, w = checkpoint.config, checkpoint.weights
    t, dh = len(ids), c.head_dim

    def W(name):
        return w[name].double()

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_eps) * weight

    pos = torch.arange(t)
    angles = pos.double()[:, None] * c.rope_theta ** (-torch.arange(0, dh, 2).double() / dh)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rope(x):
        x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    h = W("tok_embeddings.weight")[ids]
    group = c.n_heads // c.n_kv_heads
    for i in range(c.n_layers):
        p = f"layers.{i}."
        x = norm(h, W(p + "attention_norm.weight"))
        q = rope((x @ W(p + "attention.wq.weight").T).view(t, c.n_heads, dh))
        k = rope((x @ W(p + "attention.wk.weight").T).view(t, c.n_kv_heads, dh)).repeat_interleave(group, 1)
        v = (x @ W(p + "attention.wv.weight").T).view(t, c.n_kv_heads, dh).repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dh)
        mask = torch.stack([patterns[i].mask(pos, pos, head) for head in range(c.n_heads)])
        attn = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, -math.inf).softmax(-1), v)
        h = h + attn.reshape(t, -1) @ W(p + "attention.wo.weight").T
        x = norm(h, W(p + "ffn_norm.weight"))
        gate, up = x @ W(p + "feed_forward.w1.weight").T, x @ W(p + "feed_forward.w3.weight").T
        h = h + (torch.nn.functional.silu(gate) * up) @ W(p + "feed_forward.w2.weight").T
    head = W("output.weight") if "output.weight" in w else W("tok_embeddings.weight")
    return torch.log_softmax(norm(h, W("norm.weight")) @ head.T, -1)


TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, counting each of the one "
        "hundred and twelve steps, and lit the great lamp so that the fishing boats could find their way home "
        "through the fog that rolled in from the cold grey sea.")
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(checkpoint):
    """One CPU engine per pattern string, built on first use (chunked prefill of 32 tokens, so that prefill chunks
    attend across chunk boundaries under the pattern)."""
    built = {}

    def get(spec):
        if spec not in built:
            built[spec] = Engine(checkpoint, EngineConfig(device="cpu", attention=spec, kv_cache_tokens=1024,
                                                          max_num_seqs=4, max_num_batched_tokens=32))
        return built[spec]
    return get


def _greedy(engine, prompt, params=GREEDY):
    rid = engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    return engine.pop_finished(rid)


def test_local_window_longer_than_the_text_equals_dense(llm, engines):
    prompt = "The capital of France is Paris, and the capital of Italy is"
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    dense = llm.generate(prompt, params)[0]
    assert len(dense.prompt_token_ids) + len(dense.token_ids) < 64
    local = _greedy(engines("local:64"), prompt, params)
    assert local.token_ids == dense.token_ids


@pytest.mark.parametrize("spec", ["local:16", "strided:8,16", "block:16,local=2,stride=3",
                                  "local:16;0=dense;-1=dense"])
def test_sparse_patterns_match_a_masked_float64_reference(checkpoint, engines, llm, spec):
    engine = engines(spec)
    prompt = engine.tokenizer.encode(TEXT)
    out = _greedy(engine, prompt)  # prefill in chunks of 32, then decode steps under the pattern
    ids = prompt + out.token_ids
    assert len(ids) > 52  # several windows and blocks
    patterns = parse_attention(spec, checkpoint.config.n_layers)
    ref = reference_logprobs(checkpoint, ids, patterns)
    # Each greedy token is the reference's argmax at its position.
    for j, token in enumerate(out.token_ids):
        row = ref[len(prompt) - 1 + j]
        assert row[token] >= row.max() - 1e-4, (j, token, int(row.argmax()))
    # Prefill (chunked) log-probabilities of the whole text equal the reference's.
    expected = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).float()
    ours = engine.score(ids)
    assert (ours - expected).abs().max() < 2e-3, (ours - expected).abs().max()
    # The pattern matters: the dense model's log-probabilities past the window are different.
    dense = llm.engine.score(ids)
    assert (dense[20:] - ours[20:]).abs().max() > 0.05
