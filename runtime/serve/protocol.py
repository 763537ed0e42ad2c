"""OpenAI's wire format: request bodies checked and turned into token ids and SamplingParams, and the JSON shapes
of responses, stream chunks and errors (OpenAI's API reference: Completions, Chat Completions).

Request fields honoured: model, prompt (completions: a string, a list of token ids, or a list of either) or messages
(chat: the model's chat template is applied), max_tokens (chat also max_completion_tokens), temperature, top_p,
seed, stop, n, stream, stream_options.include_usage, logprobs (completions: the number of alternatives per token;
chat: true, with top_logprobs alternatives), and the extensions top_k, ignore_eos and stop_token_ids. Fields that
would change the output in ways ringlet does not implement (echo, best_of != n, non-zero penalties, logit_bias,
suffix, tools, a non-text response_format) are refused with 400 rather than ignored; other unknown fields are
ignored. Log-probabilities are the model's own (before temperature, top-k and top-p), as in OpenAI's API.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

from ..engine import encode_prompt
from ..errors import RingletError
from ..outputs import TokenLogprob
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer

MAX_SEQUENCES = 128  # prompts x n in one request
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered to the client: an HTTP status and OpenAI's body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """What the server needs to know of its model to check requests: its name, tokenizer (None for a model
    without one: token-id prompts only), vocabulary size, context length (tokens), and start time (Unix s)."""

    name: str
    tokenizer: Tokenizer | None
    vocab_size: int
    max_model_len: int
    created: int


@dataclass
class ParsedRequest:
    """A checked request. `prompts` holds each prompt's token ids; `params` one SamplingParams per sequence, n
    sequences per prompt (sequence k runs prompt k // n and is choice k of the response). `logprobs` says whether
    the response carries log-probabilities."""

    chat: bool
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]
    stream: bool
    include_usage: bool
    logprobs: bool

    @property
    def sequence_prompts(self) -> list[list[int]]:
        return [self.prompts[k // self.n] for k in range(len(self.params))]


# ------------------------------------------------------------------------------------------------- checking

def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(name: str, what: str, value) -> APIError:
    return APIError(400, f"'{name}' must be {what}, got {_show(value)}", param=name, code="invalid_value")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, default, minimum: int | None = None, maximum: int | None = None,
         what: str | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = " and ".join(s for s in (f">= {minimum}" if minimum is not None else "",
                                           f"<= {maximum}" if maximum is not None else "") if s)
        raise _bad(name, what or f"an integer{' ' + bounds if bounds else ''}", value)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        raise _bad(name, f"a number in {'(' if low_open else '['}{low:g}, {high:g}]", value)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, "a boolean", value)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise _bad("stop", "a non-empty string or a list of them", value)
    return value


def _token_ids(body: dict, name: str, vocab_size: int) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(t) and 0 <= t < vocab_size for t in value):
        raise _bad(name, f"a list of token ids in [0, {vocab_size})", value)
    return value


def _unsupported(body: dict) -> None:
    """Refuse fields that would change the output in ways ringlet does not implement."""
    checks = [("echo", lambda v: v is False), ("suffix", lambda v: v == ""),
              ("frequency_penalty", lambda v: v == 0), ("presence_penalty", lambda v: v == 0),
              ("logit_bias", lambda v: v == {}), ("tools", lambda v: v == []), ("functions", lambda v: v == []),
              ("tool_choice", lambda v: v == "none"),
              ("response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")]
    for name, harmless in checks:
        value = body.get(name)
        if value is not None and not harmless(value):
            raise APIError(400, f"'{name}' = {_show(value)} is not supported by this server", param=name,
                           code="unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise APIError(400, "'best_of' other than n is not supported by this server", param="best_of",
                       code="unsupported_parameter")


def _model(body: dict, model: ServedModel) -> None:
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise _bad("model", "a string", name)
    if name != model.name:
        raise APIError(404, f"The model `{name}` does not exist (this server serves `{model.name}`)",
                       param="model", code="model_not_found")


def _context_error(model: ServedModel, prompt_tokens: int, max_tokens: int | None, param: str) -> APIError:
    asked = f"{prompt_tokens} in the prompt" + (f" + {max_tokens} for the completion" if max_tokens else "")
    return APIError(400, f"This model's maximum context length is {model.max_model_len} tokens, however you "
                         f"requested {prompt_tokens + (max_tokens or 0)} tokens ({asked}). Please reduce the length "
                         f"of the prompt or the completion.", param=param, code="context_length_exceeded")


def _encode(model: ServedModel, prompt, param: str) -> list[int]:
    try:
        ids = encode_prompt(model.tokenizer, prompt, model.vocab_size, sys.maxsize)
    except RingletError as e:
        raise APIError(400, str(e), param=param, code="invalid_prompt") from None
    if len(ids) >= model.max_model_len:
        raise _context_error(model, len(ids), None, param)
    return ids


def _completion_prompts(body: dict, model: ServedModel) -> list[list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt  # a batch of prompts: strings or token-id lists
    elif isinstance(prompt, (str, list)):
        prompts = [prompt]
    else:
        raise _bad("prompt", "a string, a list of token ids, or a list of those", prompt)
    return [_encode(model, p, "prompt") for p in prompts]


def _message_text(index: int, message) -> dict:
    """A message with its content as one string (text parts joined); refuses anything that is not text."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"messages[{index}] must be an object with a string 'role'", param="messages",
                       code="invalid_value")
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{index}].content: only text parts are supported, got "
                                    f"{_show(part)}", param="messages", code="invalid_value")
            parts.append(part["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise _bad(f"messages[{index}].content", "a string or a list of text parts", content)
    return {"role": message["role"], "content": content}


def _chat_prompt(body: dict, model: ServedModel) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of {role, content} objects", messages)
    messages = [_message_text(i, m) for i, m in enumerate(messages)]
    if model.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, hence no chat template: use /v1/completions with token "
                            "ids", param="messages", code="invalid_value")
    try:
        text = model.tokenizer.apply_chat_template(messages)
    except (RingletError, TypeError, ValueError) as e:
        raise APIError(400, f"chat template: {e}", param="messages", code="invalid_value") from None
    return _encode(model, text, "messages")


def parse_request(raw: bytes, model: ServedModel, chat: bool) -> ParsedRequest:
    """Check a /v1/completions (chat=False) or /v1/chat/completions body; raises APIError for anything wrong."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                            "object.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    _model(body, model)
    _unsupported(body)
    n = _int(body, "n", 1, minimum=1, maximum=MAX_SEQUENCES)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _int(body, "top_k", 0, minimum=-1)  # -1 (vLLM's "off") and anything >= the vocabulary disable it
    top_k = top_k if 0 < top_k < model.vocab_size else 0
    seed = _int(body, "seed", None, minimum=-(1 << 63), maximum=(1 << 63) - 1, what="a 64-bit integer")
    stop = _stop(body)
    stop_token_ids = _token_ids(body, "stop_token_ids", model.vocab_size)
    ignore_eos = _bool(body, "ignore_eos", False)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), (bool, type(None)))):
        raise _bad("stream_options", "an object {include_usage: boolean}", options)
    if options is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options",
                       code="invalid_value")
    if chat:
        want_logprobs = _bool(body, "logprobs", False)
        top = _int(body, "top_logprobs", None, minimum=0, maximum=MAX_LOGPROBS)
        if top is not None and not want_logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        logprobs = (top or 0) if want_logprobs else None
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        prompts = [_chat_prompt(body, model)]
    else:
        logprobs = _int(body, "logprobs", None, minimum=0, maximum=MAX_LOGPROBS)
        max_name = "max_tokens"
        prompts = _completion_prompts(body, model)
    max_tokens = _int(body, max_name, None, minimum=1)
    if len(prompts) * n > MAX_SEQUENCES:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is more than {MAX_SEQUENCES} sequences in one request",
                       param="n", code="invalid_value")
    params = []
    for prompt in prompts:
        room = model.max_model_len - len(prompt)
        if max_tokens is not None and max_tokens > room:
            raise _context_error(model, len(prompt), max_tokens, max_name)
        # OpenAI's defaults: 16 tokens for completions, the rest of the context for chat.
        limit = max_tokens if max_tokens is not None else (room if chat else min(16, room))
        for j in range(n):
            # Choice j of a seeded request draws from seed + j (kept in torch's 64-bit seed range).
            params.append(SamplingParams(max_tokens=limit, temperature=temperature, top_k=top_k, top_p=top_p,
                                         seed=None if seed is None else (seed + j) % (1 << 64), stop=list(stop),
                                         stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
                                         logprobs=logprobs))
    include_usage = bool(options and options.get("include_usage"))
    return ParsedRequest(chat, prompts, n, params, stream, include_usage, logprobs is not None)


# ------------------------------------------------------------------------------------------------ responses

def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    """One token as text (special tokens spelled out); "token_id:N" for a model without a tokenizer."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer | None, logprobs: list[TokenLogprob], offset: int) -> dict:
    """The completions API's logprobs object for some generated tokens; `offset` is where the first token's text
    starts in the choice's text (text_offset counts characters of the token strings from there)."""
    tokens, offsets = [], []
    for lp in logprobs:
        tokens.append(token_text(tokenizer, lp.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(tokenizer, t): v for t, v in lp.top.items()} for lp in logprobs],
            "text_offset": offsets}


def _chat_token(tokenizer: Tokenizer | None, token_id: int, logprob: float) -> dict:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(tokenizer: Tokenizer | None, logprobs: list[TokenLogprob]) -> dict:
    """The chat API's logprobs object {"content": [...]} for some generated tokens."""
    return {"content": [{**_chat_token(tokenizer, lp.token_id, lp.logprob),
                         "top_logprobs": [_chat_token(tokenizer, t, v) for t, v in lp.top.items()]}
                        for lp in logprobs]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def envelope(response_id: str, created: int, model: str, chat: bool, chunk: bool, choices: list[dict],
             usage_obj: dict | None = None, with_usage: bool = True) -> dict:
    """A response (chunk=False) or stream chunk around `choices`; a chunk carries "usage" only if with_usage (as
    OpenAI's stream does when stream_options.include_usage is set: null in every chunk but the last)."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body = {"id": response_id, "object": kind, "created": created, "model": model, "choices": choices}
    if with_usage:
        body["usage"] = usage_obj
    return body


def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON (a str is sent as is: the final "[DONE]")."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
