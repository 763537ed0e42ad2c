"""Async scheduling (Engine.step queues a decode step before the previous step's tokens reach the host) on the
bundled model, on the CPU: outputs equal those of the engine that waits for every token, whatever ends a request
(length, stop token, stop string, abort) and however the batch changes (arrivals waiting for a slot, a page pool
so small that sequences are preempted, logprobs). A request that ends by a stop or an abort still takes part in the
one step queued ahead of that news, as a row whose token is dropped."""
import pytest

from ringlet import SamplingParams
from ringlet.engine import Engine, EngineConfig
from test_engine import PROMPTS as ENGINE_PROMPTS

PROMPTS = [ENGINE_PROMPTS[i] for i in (0, 1, 2, 3, 4, 6)]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


# Requests ending at different steps, by length (3..24 tokens); one sampled with its own seed.
LENGTHS = [greedy(24), greedy(24), greedy(24), greedy(3),
           SamplingParams(max_tokens=17, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True), greedy(9)]


def _engine(checkpoint, async_scheduling, **kw):
    return Engine(checkpoint, EngineConfig(device="cpu", async_scheduling=async_scheduling, **kw))


def _run(engine, prompts, params):
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
    return [engine.pop_finished(i) for i in ids]


def _outputs(outs):
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


@pytest.mark.parametrize("kw", [{}, {"max_num_seqs": 3}, {"kv_cache_tokens": 8 * 16, "max_model_len": 8 * 16}],
                         ids=["lengths", "queue", "preemption"])
def test_outputs_equal_the_waiting_engine(checkpoint, kw):
    waiting = _run(_engine(checkpoint, False, **kw), PROMPTS, LENGTHS)
    engine = _engine(checkpoint, True, **kw)
    ahead = _run(engine, PROMPTS, LENGTHS)
    assert _outputs(ahead) == _outputs(waiting)
    assert [len(o.token_ids) for o in ahead] == [p.max_tokens for p in LENGTHS]
    assert engine.steps_ahead > 5
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_pages
    if "kv_cache_tokens" in kw:
        assert sum(o.num_preemptions for o in ahead) > 0, "the pool was meant to force preemptions"


def test_stop_token_and_stop_string_end_requests_without_extra_tokens(checkpoint):
    plain = _run(_engine(checkpoint, False), PROMPTS, LENGTHS)
    text = plain[2].text
    params = list(LENGTHS)
    params[1] = greedy(24, stop_token_ids=[plain[1].token_ids[5]])
    params[2] = greedy(24, stop=[text[len(text) // 2:len(text) // 2 + 3]])
    waiting = _run(_engine(checkpoint, False), PROMPTS, params)
    engine = _engine(checkpoint, True)
    ahead = _run(engine, PROMPTS, params)
    assert _outputs(ahead) == _outputs(waiting)
    assert [o.finish_reason for o in ahead] == ["length", "stop", "stop", "length", "length", "length"]
    assert engine.steps_ahead > 10
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_pages


def test_arrival_and_abort_while_a_step_is_queued_ahead(checkpoint):
    def scenario(async_scheduling):
        engine = _engine(checkpoint, async_scheduling)
        first = engine.add_request(PROMPTS[0], greedy(12))
        doomed = engine.add_request(PROMPTS[2], greedy(24))
        for _ in range(4):
            engine.step()
        queued = engine._ahead is not None
        engine.abort(doomed)
        late = engine.add_request(PROMPTS[3], greedy(6))
        while engine.has_unfinished():
            engine.step()
        assert engine.kv.allocator.num_free == engine.kv.allocator.num_pages
        return queued, _outputs([engine.pop_finished(i) for i in (first, doomed, late)])

    queued, ahead = scenario(True)
    assert queued
    assert ahead == scenario(False)[1]
    assert [(len(ids), reason) for ids, _, reason in ahead] == [(12, "length"), (4, "abort"), (6, "length")]


def test_logprobs_requests_wait_for_their_tokens(checkpoint):
    """Logprobs are read from the logits, which the next step would overwrite: nothing runs ahead of such a
    request, and its output and logprobs equal the waiting engine's."""
    params = [greedy(6, logprobs=2)] * 2
    waiting = _run(_engine(checkpoint, False), PROMPTS[:2], params)
    engine = _engine(checkpoint, True)
    ahead = _run(engine, PROMPTS[:2], params)
    assert _outputs(ahead) == _outputs(waiting)
    assert engine.steps_ahead == 0
    assert [[(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs] for o in ahead] == \
        [[(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs] for o in waiting]
