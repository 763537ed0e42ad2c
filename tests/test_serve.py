"""`python -m ringlet serve` as users run it: the real server in a subprocess on a free loopback port, driven by
the official `openai` client (and raw HTTP where the client would refuse to send the input)."""
import asyncio
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest
from mpi_util import write_random_model
from ringlet import SamplingParams
from serve_util import Server, idle_metrics, metrics, sample

KEY = "sk-ringlet-test"
SMALL = "tiny-random"  # served name of the small random model
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, request):
    """Three servers: the bundled model; a small random model behind an API key, with async scheduling on (the
    GPU default: every test against it also covers an engine that queues decode steps ahead); the same small model
    with room for 2 running sequences, no queue and a 10-page KV cache. They load while this process loads its
    own."""
    d = tmp_path_factory.mktemp("serve")
    # One torch thread per server: the test process computes references beside them on 2 cores, and spinning
    # thread pools that outnumber the cores slow every process down many times over.
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = [Server(d / "bundled.log", "--model", "default", "--max-num-seqs", "8", env=one_thread)]
    try:
        model = write_random_model(d / "model", request.getfixturevalue("checkpoint").tokenizer, seed=3)
        started.append(Server(d / "small.log", "--model", model, "--served-model-name", SMALL, "--api-key", KEY,
                              "--async-scheduling", "on", env=one_thread))
        started.append(Server(d / "tight.log", "--model", model, "--served-model-name", SMALL, "--max-num-seqs",
                              "2", "--max-queue", "0", "--kv-cache-tokens", "160", env=one_thread))
        request.getfixturevalue("llm")
        yield dict(zip(("bundled", "small", "tight"), (server.wait() for server in started)))
    finally:
        for server in started:
            server.kill()


def client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=120)


def aclient(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)


# --- the bundled model: output equals the Python API's --------------------------------------------------------

def test_greedy_completion_equals_the_python_api(servers, llm):
    prompt = "The capital of France is"
    got = client(servers["bundled"]).completions.create(model="default", prompt=prompt, max_tokens=8,
                                                        temperature=0)
    want = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert got.object == "text_completion" and got.model == "default"
    assert got.choices[0].text == want.text and want.text.strip()
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == \
        (len(want.prompt_token_ids), len(want.token_ids), len(want.prompt_token_ids) + len(want.token_ids))


def test_chat_applies_the_template_whole_and_streamed(servers, llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 7 times 8?"}]
    want = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0.0))
    c = client(servers["bundled"])
    whole = c.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == want.text
    assert whole.usage.prompt_tokens == len(want.prompt_token_ids)
    assert whole.usage.completion_tokens == len(want.token_ids)
    chunks = list(c.chat.completions.create(model="default", messages=messages, max_completion_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_logprobs(servers, llm):
    messages = [{"role": "user", "content": "Say hello"}]
    got = client(servers["bundled"]).chat.completions.create(model="default", messages=messages, max_tokens=4,
                                                             temperature=0, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens == 4
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs))  # greedy: the top token
        assert item.token == item.top_logprobs[0].token and bytes(item.bytes).decode() == item.token
    assert "".join(item.token for item in content) == got.choices[0].message.content


BAD = [  # (endpoint, body, status, param, code); bodies given as bytes are sent as they are
    ("completions", b'{"model": "default", "prompt": ', 400, None, "invalid_json"),
    ("completions", b"\xff\xfe not utf-8", 400, None, "invalid_json"),
    ("completions", [1, 2, 3], 400, None, "invalid_json"),
    ("completions", {"prompt": 5}, 400, "prompt", None),
    ("completions", {"prompt": []}, 400, "prompt", None),
    ("completions", {"prompt": ""}, 400, "prompt", None),
    ("completions", {"prompt": [99999999]}, 400, "prompt", None),
    ("completions", {"prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("completions", {"prompt": "Hi", "max_tokens": -3}, 400, "max_tokens", None),
    ("completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"prompt": "Hi", "max_tokens": 1.5}, 400, "max_tokens", None),
    ("completions", {"prompt": "Hi", "temperature": -0.5}, 400, "temperature", None),
    ("completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature", None),
    ("completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p", None),
    ("completions", {"prompt": "Hi", "n": 0}, 400, "n", None),
    ("completions", {"prompt": "Hi", "stop": [""]}, 400, "stop", None),
    ("completions", {"prompt": "Hi", "seed": "x"}, 400, "seed", None),
    ("completions", {"prompt": "Hi", "logprobs": 99}, 400, "logprobs", None),
    ("completions", {"prompt": "Hi", "stream": "yes"}, 400, "stream", None),
    ("completions", {"prompt": "Hi", "presence_penalty": 1.0}, 400, "presence_penalty", "unsupported_parameter"),
    ("completions", {"prompt": "word " * 9000}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": "Hi", "max_tokens": 10 ** 30}, 400, "max_tokens", "context_length_exceeded"),
    ("completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
     None),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs",
     None),
    ("embeddings", {"input": "x"}, 404, None, None),
]


def test_bad_input_is_answered_while_a_long_stream_goes_on(servers):
    server = servers["bundled"]
    prompt = "Once upon a time"
    # The reference: the same greedy request answered alone (test_greedy_... ties the server to the Python API).
    want = client(server).completions.create(model="default", prompt=prompt, max_tokens=24, temperature=0).choices[0]
    seen: dict = {"text": [], "chunks": 0}
    started = threading.Event()

    def long_stream():
        with httpx.stream("POST", server.v1 + "/completions", timeout=120,
                          json={"model": "default", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                                "stream": True}) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    seen["done"] = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    seen["text"].append(choice["text"])
                    seen["finish"] = choice["finish_reason"]
                    seen["chunks"] += 1
                    seen["last"] = time.monotonic()
                    started.set()

    reader = threading.Thread(target=long_stream, daemon=True)
    reader.start()
    assert started.wait(60), "the long stream produced nothing"
    for endpoint, body, status, param, code in BAD:
        if isinstance(body, dict) and endpoint != "embeddings":
            body = {"model": "default", **body}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(f"{server.v1}/{endpoint}", content=content, timeout=60,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == status, (endpoint, body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["param"] == param and (code is None or error["code"] == code), (body, error)
    answered = time.monotonic()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(servers["bundled"]).completions.create(model="default", prompt="Hi", temperature=-1)
    with pytest.raises(openai.NotFoundError) as missing:
        client(servers["bundled"]).completions.create(model="gpt-4", prompt="Hi")
    assert missing.value.code == "model_not_found"
    reader.join(120)
    assert seen.get("done") and seen["finish"] == want.finish_reason == "length" and seen["chunks"] == 24
    assert "".join(seen["text"]) == want.text  # unharmed: exactly the greedy output
    assert seen["last"] > answered, "the long stream ended before the bad requests were answered: nothing overlapped"
    m = metrics(server.url)
    assert sample(m, "ringlet_requests_total", model="default", outcome="error") >= len(BAD) - 1 + 2


# --- the small random model -----------------------------------------------------------------------------------

def test_models_health_and_api_key(servers):
    small = servers["small"]
    assert httpx.get(small.url + "/health").json() == {"status": "ok"}  # no key needed for probes
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(small.v1 + "/completions", json={"model": SMALL, "prompt": "Hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(small.v1 + "/models", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(small, key="wrong").completions.create(model=SMALL, prompt="Hi", max_tokens=2)
    models = client(small).models.list()
    assert [m.id for m in models.data] == [SMALL]
    assert client(small).models.retrieve(SMALL).id == SMALL
    got = client(small).completions.create(model=SMALL, prompt="Hi", max_tokens=3, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 3 and got.choices[0].finish_reason == "length"


def test_stream_equals_whole_and_stop_strings_cut(servers):
    c = client(servers["small"])
    args = dict(model=SMALL, prompt="Hello there", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    whole = c.completions.create(**args).choices[0].text
    streamed = [ch.choices[0] for ch in c.completions.create(**args, stream=True)]
    assert len(streamed) == 30  # one chunk per token
    assert "".join(ch.text for ch in streamed) == whole and streamed[-1].finish_reason == "length"
    assert len(whole) > 12
    stop = whole[8:11]
    cut = whole[:whole.find(stop)]
    got = c.completions.create(**args, stop=[stop, "never appears \u2603"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 30
    streamed = [ch.choices[0] for ch in c.completions.create(**args, stop=stop, stream=True)]
    assert "".join(ch.text for ch in streamed) == cut and streamed[-1].finish_reason == "stop"


def test_n_choices_draw_from_seed_plus_index(servers):
    c = client(servers["small"])
    args = dict(model=SMALL, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                extra_body={"ignore_eos": True, "top_k": 50})
    got = c.completions.create(**args, n=3, seed=7)
    assert [ch.index for ch in got.choices] == [0, 1, 2]
    texts = [ch.text for ch in got.choices]
    assert len(set(texts)) == 3
    assert got.usage.completion_tokens == 24 and got.usage.prompt_tokens == 4  # the prompt counts once
    assert [ch.text for ch in c.completions.create(**args, n=3, seed=7).choices] == texts
    assert c.completions.create(**args, seed=8).choices[0].text == texts[1]
    parts = {0: [], 1: [], 2: []}
    for chunk in c.completions.create(**args, n=3, seed=7, stream=True):
        parts[chunk.choices[0].index].append(chunk.choices[0].text)
    assert ["".join(parts[k]) for k in range(3)] == texts


def test_completion_logprobs(servers):
    got = client(servers["small"]).completions.create(model=SMALL, prompt=[5, 6, 7], max_tokens=6, temperature=0,
                                                      logprobs=3, extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and value == pytest.approx(max(top.values())) and token in top


def test_disconnect_mid_stream_frees_pages_at_once(servers):
    small = servers["small"]
    before = metrics(small.url)
    assert sample(before, "ringlet_kv_pages_used", model=SMALL, replica="0") == 0
    body = {"model": SMALL, "prompt": [9, 8, 7, 6], "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", small.v1 + "/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        events = 0
        while events < 3:
            events += next(lines).startswith("data: ")
        assert sample(metrics(small.url), "ringlet_kv_pages_used", model=SMALL, replica="0") > 0
    # leaving the block closed the connection mid-stream
    after = idle_metrics(small.url, SMALL)
    assert sample(after, "ringlet_kv_pages_free", model=SMALL, replica="0") == \
        sample(before, "ringlet_kv_pages_free", model=SMALL, replica="0")
    assert sample(after, "ringlet_requests_total", model=SMALL, outcome="aborted") == \
        sample(before, "ringlet_requests_total", model=SMALL, outcome="aborted") + 1
    generated = (sample(after, "ringlet_generation_tokens_total", model=SMALL)
                 - sample(before, "ringlet_generation_tokens_total", model=SMALL))
    assert 3 <= generated < 480  # stopped early, not run to the end
    assert sample(after, "ringlet_requests_running", model=SMALL, replica="0") == 0


def test_64_concurrent_streams_complete_with_correct_usage(servers):
    small = servers["small"]
    before = metrics(small.url)
    prompts = [[100 + i, 200 + 3 * i, 300][:1 + i % 3] for i in range(64)]
    limits = [4 + (i * 5) % 17 for i in range(64)]

    async def one(c, i):
        stream = await c.completions.create(model=SMALL, prompt=prompts[i], max_tokens=limits[i], temperature=0.8,
                                            seed=i, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
        chunks, usage, finish = 0, None, None
        async for chunk in stream:
            if chunk.choices:
                chunks += 1
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage
        return chunks, usage, finish

    async def all_of_them():
        c = aclient(small)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(64)))
        finally:
            await c.close()

    results = asyncio.run(all_of_them())
    for i, (chunks, usage, finish) in enumerate(results):
        assert finish == "length" and chunks == limits[i], (i, chunks, finish)
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
            (len(prompts[i]), limits[i], len(prompts[i]) + limits[i])
    after = idle_metrics(small.url, SMALL)

    def delta(name, **labels):
        return sample(after, name, model=SMALL, **labels) - sample(before, name, model=SMALL, **labels)

    assert delta("ringlet_requests_total", outcome="length") == 64
    assert delta("ringlet_requests_total", outcome="error") == delta("ringlet_requests_total", outcome="aborted") == 0
    assert delta("ringlet_prompt_tokens_total") == sum(map(len, prompts))
    assert delta("ringlet_generation_tokens_total") == sum(limits)
    assert delta("ringlet_time_to_first_token_seconds_count") == 64
    assert delta("ringlet_inter_token_latency_seconds_count") == sum(limits) - 64
    assert delta("ringlet_routed_requests_total", replica="0") == 64
    assert sample(after, "ringlet_requests_running", model=SMALL, replica="0") == 0
    assert sample(after, "ringlet_requests_queued", model=SMALL, replica="0") == 0


def test_full_server_answers_429_and_preempts_under_a_small_pool(servers):
    tight = servers["tight"]
    body = {"model": SMALL, "prompt": [11, 12, 13, 14], "max_tokens": 150, "ignore_eos": True, "stream": True}
    counts = []
    with httpx.stream("POST", tight.v1 + "/completions", json=body, timeout=60) as first, \
            httpx.stream("POST", tight.v1 + "/completions", json=body, timeout=60) as second:
        # Both are admitted (their headers came back): 2 running is the limit and the queue holds 0.
        r = httpx.post(tight.v1 + "/completions", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["param"] is None
        with pytest.raises(openai.RateLimitError):
            client(tight).completions.create(model=SMALL, prompt="Hi", max_tokens=2)
        for response in (first, second):
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            counts.append((len(chunks), chunks[-1]["choices"][0]["finish_reason"]))
    assert counts == [(150, "length"), (150, "length")]
    m = idle_metrics(tight.url, SMALL)
    # 10 pages of 16 tokens cannot hold two sequences of 154 tokens: one was preempted and recomputed.
    assert sample(m, "ringlet_preemptions_total", model=SMALL, replica="0") >= 1
    assert sample(m, "ringlet_requests_total", model=SMALL, outcome="rejected") == 2
    assert sample(m, "ringlet_kv_pages_free", model=SMALL, replica="0") == 10
    got = client(tight).completions.create(model=SMALL, prompt="Hi", max_tokens=2)  # room again
    assert got.usage.completion_tokens <= 2


def test_signals_stop_the_server_cleanly(servers):
    assert servers["small"].stop(signal.SIGTERM) == 0
    assert servers["tight"].stop(signal.SIGINT) == 0
    for name in ("small", "tight"):
        log = servers[name].log.read_text()
        assert "Traceback" not in log and "error" not in log.lower(), log
