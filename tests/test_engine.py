"""The continuous-batching engine on the bundled model: batching invariance, chunked prefill, preemption,
sampling, stop conditions, streaming and bad input."""
import pytest

from ringlet import LLM, RequestError, SamplingParams
from ringlet.engine import Engine, EngineConfig

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
    "Hello",
    "The three primary colours are red,",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Paris, London, Berlin, Madrid,",
]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0)


@pytest.fixture(scope="module")
def alone(llm):
    """Greedy outputs of each prompt run by itself."""
    return [llm.generate([p], GREEDY)[0] for p in PROMPTS]


def test_greedy_output_is_the_same_alone_and_batched(llm, alone):
    together = llm.generate(PROMPTS, GREEDY)
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids, a.prompt
        assert a.text == b.text
    assert all(len(a.token_ids) == 32 or a.finish_reason == "stop" for a in alone)


def _engine(checkpoint, **kw):
    return Engine(checkpoint, EngineConfig(device="cpu", **kw))


def _run(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [engine.pop_finished(i) for i in ids]


def test_preemption_under_a_tiny_page_pool_recomputes_to_the_same_output(checkpoint, alone):
    engine = _engine(checkpoint, kv_cache_tokens=20 * 16, max_model_len=20 * 16)
    outs = _run(engine, PROMPTS, GREEDY)
    assert sum(o.num_preemptions for o in outs) > 0, "the pool was meant to be too small to avoid preemption"
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_pages


def test_chunked_prefill_gives_the_same_output(checkpoint, alone):
    engine = _engine(checkpoint, max_num_batched_tokens=16, max_num_seqs=4)
    outs = _run(engine, PROMPTS[:3], GREEDY)
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone[:3]]
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_pages


def test_requests_join_and_leave_between_steps(checkpoint, alone):
    engine = _engine(checkpoint)
    first = engine.add_request(PROMPTS[0], GREEDY)
    for _ in range(5):
        engine.step()
    late = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=4, temperature=0.0))
    while engine.is_unfinished(late):
        engine.step()
    assert engine.is_unfinished(first)
    assert engine.pop_finished(late).token_ids == alone[2].token_ids[:4]
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_finished(first).token_ids == alone[0].token_ids


def test_stream_pieces_add_up_to_the_completion(llm, alone):
    chunks = list(llm.stream(PROMPTS[2], GREEDY))
    assert "".join(c.text for c in chunks) == alone[2].text
    assert [t for c in chunks for t in c.token_ids] == alone[2].token_ids
    assert chunks[-1].finish_reason == alone[2].finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_max_tokens_ends_with_length(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_cuts_the_text(llm, alone):
    full = alone[2].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=32, temperature=0.0, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.index(stop)]


def test_stop_token_id_ends_generation(llm, alone):
    ids = alone[6].token_ids
    stop_id = ids[6]
    out = llm.generate(PROMPTS[6], SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ids[:ids.index(stop_id) + 1]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    a = llm.generate(PROMPTS[0], p)[0].token_ids
    b = llm.generate(PROMPTS, [p if i == 0 else SamplingParams(max_tokens=16, temperature=1.0)
                               for i in range(len(PROMPTS))])[0].token_ids
    c = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99))[0].token_ids
    assert a == b
    assert a != c


def test_top_k_1_and_tiny_top_p_are_greedy(llm, alone):
    for p in (SamplingParams(max_tokens=32, temperature=1.0, top_k=1, seed=0),
              SamplingParams(max_tokens=32, temperature=1.0, top_p=1e-6, seed=0)):
        assert llm.generate(PROMPTS[3], p)[0].token_ids == alone[3].token_ids


def test_logprobs_match_a_scoring_pass(llm, alone):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.0, logprobs=3))[0]
    assert len(out.logprobs) == 8
    prompt_ids = out.prompt_token_ids
    scored = llm.engine.score(prompt_ids + out.token_ids)[len(prompt_ids) - 1:]
    for lp, ref in zip(out.logprobs, scored.tolist()):
        assert len(lp.top) == 3
        assert lp.token_id == max(lp.top, key=lp.top.get)  # greedy picks the most likely
        assert lp.logprob == pytest.approx(ref, abs=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"logprobs": 50}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params_are_refused(kwargs, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_are_refused_while_others_keep_running(checkpoint, alone):
    engine = _engine(checkpoint)
    good = engine.add_request(PROMPTS[4], GREEDY)
    engine.step()
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("", GREEDY)
    with pytest.raises(RequestError, match="context"):
        engine.add_request("word " * 9000, GREEDY)
    with pytest.raises(RequestError, match="vocabulary"):
        engine.add_request([1, 2, 10**9], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request(PROMPTS[0], GREEDY, request_id=good)
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_finished(good).token_ids == alone[4].token_ids


def test_generate_names_the_bad_prompt_and_runs_nothing(llm):
    with pytest.raises(RequestError, match="prompt 1"):
        llm.generate(["fine", ""], GREEDY)
    assert not llm.engine.has_unfinished()


def test_abort_frees_pages(checkpoint):
    engine = _engine(checkpoint)
    rid = engine.add_request(PROMPTS[2], GREEDY)
    engine.step()
    assert engine.kv.allocator.num_free < engine.kv.allocator.num_pages
    engine.abort(rid)
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_pages
    assert engine.pop_finished(rid).finish_reason == "abort"


@pytest.mark.parametrize("option, needle", [
    ({"rope_scaling": "yarn:x"}, "rope scaling 'yarn:x': factor 'x' is not a number"),
    ({"kv_dtype": "int8"}, "kv_dtype 'int8' is not one of"),
    ({"quant": "int3"}, "unknown quantization method 'int3'"),
    ({"dtype": "fp64"}, "dtype 'fp64' is not one of"),
    ({"max_num_seqs": 0}, "max_num_seqs must be >= 1"),
    ({"attention": "local:256;1=locl:8"}, "'locl:8' is not a pattern"),
])
def test_bad_options_are_refused_before_the_model_loads(option, needle):
    # The model path does not exist: loading first would raise about the path instead.
    from ringlet.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        LLM("/no/such/model.gguf", device="cpu", **option)
    assert needle in str(e.value), str(e.value)


def test_unknown_llm_option_and_pattern_are_refused():
    from ringlet.errors import ConfigError
    with pytest.raises(ConfigError, match="no_such_option"):
        LLM("default", no_such_option=1)
    with pytest.raises(ConfigError, match="local:0"):
        LLM("default", attention="local:0")
