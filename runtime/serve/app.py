"""The HTTP routes (Starlette): OpenAI-compatible /v1/completions and /v1/chat/completions (JSON, or server-sent
events with `stream: true`), /v1/models, /health and /metrics.

A generation request is checked and tokenized in a worker thread (protocol.parse_request), handed to the engine
loop, and its output comes back on an asyncio queue of its own as (choice index, StreamChunk | Failure). A client
that goes away (mid-stream, or while waiting for a whole response) has its sequences aborted at once. Errors are
OpenAI's body {"error": {"message", "type", "param", "code"}} with the matching status. With an API key, /v1/...
needs `Authorization: Bearer KEY`; /health and /metrics stay open (probes and Prometheus scrapers).
"""
from __future__ import annotations

import asyncio
import hmac
import sys
import time
import traceback
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..outputs import StreamChunk
from . import protocol
from .engine_loop import EngineLoop, EngineStopped, Failure, Overloaded
from .metrics import ServerMetrics
from .protocol import APIError, ParsedRequest, ServedModel

RETRY_AFTER_S = 1


def error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class _Choice:
    """What one choice of a response has produced so far."""

    def __init__(self):
        self.text: list[str] = []
        self.tokens = 0
        self.logprobs: list = []
        self.chars = 0  # characters of token strings so far (the completions API's text_offset)
        self.finish_reason: str | None = None


class Routes:
    """The route handlers of one server (its engine loop, model, metrics and API key)."""

    def __init__(self, engine: EngineLoop, model: ServedModel, metrics: ServerMetrics, api_key: str | None):
        self.engine, self.model, self.metrics, self.api_key = engine, model, metrics, api_key

    # -- plain endpoints -----------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if not self.engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    def _model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": self.model.created, "owned_by": "ringlet",
                "max_model_len": self.model.max_model_len}

    async def models(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        name = request.path_params["name"]
        if name != self.model.name:
            return error_response(APIError(404, f"The model `{name}` does not exist", param="model",
                                           code="model_not_found"))
        return JSONResponse(self._model_card())

    def _denied(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        return error_response(APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                                       code="invalid_api_key"))

    # -- generation ----------------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        if (denied := self._denied(request)) is not None:
            self.metrics.outcome("error")
            return denied
        try:
            parsed = await run_in_threadpool(protocol.parse_request, await request.body(), self.model, chat)
        except APIError as e:
            self.metrics.outcome("error")
            return error_response(e)
        except ClientDisconnect:  # gone while sending its body: nothing was started
            self.metrics.outcome("aborted")
            return Response(status_code=499)
        response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        request_ids = [f"{response_id}-{k}" for k in range(len(parsed.params))]
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(index: int, event) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed: the server is going down, nobody is listening
                pass

        try:
            self.engine.submit(request_ids, parsed.sequence_prompts, parsed.params, sink)
        except Overloaded as e:
            self.metrics.outcome("rejected")
            return error_response(APIError(429, f"{e}; retry later", code="rate_limit_exceeded",
                                           kind="rate_limit_error"), headers={"Retry-After": str(RETRY_AFTER_S)})
        except EngineStopped as e:
            self.metrics.outcome("error")
            return error_response(APIError(503, str(e), kind="server_error"))
        self.metrics.prompt_tokens.labels(self.model.name).inc(sum(len(p) for p in parsed.prompts))
        run = _Run(self, parsed, response_id, request_ids, events)
        if parsed.stream:
            return _EventStream(run)
        return await run.collect(request)


class _Run:
    """One accepted generation request: turns its events into a response or a stream, and aborts whatever is left
    of it when it ends early (the client went away, or a choice failed)."""

    def __init__(self, routes: Routes, parsed: ParsedRequest, response_id: str, request_ids: list[str],
                 events: asyncio.Queue):
        self.routes, self.parsed, self.response_id, self.request_ids = routes, parsed, response_id, request_ids
        self.events = events
        self.tokenizer = routes.model.tokenizer
        self.created = int(time.time())
        self.choices = [_Choice() for _ in request_ids]
        self.outcome = "aborted"
        self.closed = False

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def close(self) -> None:
        """Abort what is still running and count the outcome (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        left = [rid for rid, c in zip(self.request_ids, self.choices) if c.finish_reason is None]
        if left:
            self.routes.engine.abort(left)
        self.routes.metrics.outcome(self.outcome)

    def _finished_outcome(self) -> str:
        return "length" if any(c.finish_reason == "length" for c in self.choices) else "stop"

    def _usage(self) -> dict:
        return protocol.usage(sum(len(p) for p in self.parsed.prompts), sum(c.tokens for c in self.choices))

    def _logprobs(self, choice: _Choice, chunk: StreamChunk) -> dict | None:
        if not self.parsed.logprobs:
            return None
        if self.parsed.chat:
            return protocol.chat_logprobs(self.tokenizer, chunk.logprobs or [])
        obj = protocol.completion_logprobs(self.tokenizer, chunk.logprobs or [], choice.chars)
        choice.chars += sum(len(t) for t in obj["tokens"])
        return obj

    def _envelope(self, choices: list[dict], chunk: bool, usage: dict | None = None) -> dict:
        with_usage = not chunk or self.parsed.include_usage
        return protocol.envelope(self.response_id, self.created, self.routes.model.name, self.parsed.chat, chunk,
                                 choices, usage, with_usage)

    async def collect(self, request: Request) -> Response:
        """The whole response as one JSON body; aborts the request if the client disconnects first."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not self.done:
                get = asyncio.ensure_future(self.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return Response(status_code=499)  # nobody is listening any more
                index, event = get.result()
                if isinstance(event, Failure):
                    self.outcome = "error"
                    return error_response(APIError(event.status, event.message,
                                                   kind="invalid_request_error" if event.status < 500
                                                   else "server_error"))
                choice = self.choices[index]
                choice.text.append(event.text)
                choice.tokens += len(event.token_ids)
                if event.logprobs is not None:
                    choice.logprobs += event.logprobs
                choice.finish_reason = event.finish_reason
            self.outcome = self._finished_outcome()
            make = protocol.chat_choice if self.parsed.chat else protocol.completion_choice
            choices = []
            for k, c in enumerate(self.choices):
                logprobs = None
                if self.parsed.logprobs:
                    logprobs = (protocol.chat_logprobs(self.tokenizer, c.logprobs) if self.parsed.chat
                                else protocol.completion_logprobs(self.tokenizer, c.logprobs, 0))
                choices.append(make(k, "".join(c.text), c.finish_reason, logprobs))
            return JSONResponse(self._envelope(choices, chunk=False, usage=self._usage()))
        finally:
            gone.cancel()
            self.close()

    async def stream(self):
        """Server-sent events in OpenAI's format: a chunk per engine output, then (with include_usage) a usage
        chunk with no choices, then `data: [DONE]`. Cancelled by Starlette when the client disconnects."""
        chat = self.parsed.chat
        try:
            if chat:  # OpenAI's first chunk of each choice: the role, no content
                yield protocol.sse(self._envelope([protocol.chat_delta(k, {"role": "assistant", "content": ""},
                                                                       None, None)
                                                   for k in range(len(self.choices))], chunk=True))
            while not self.done:
                index, event = await self.events.get()
                if isinstance(event, Failure):
                    self.outcome = "error"
                    kind = "invalid_request_error" if event.status < 500 else "server_error"
                    yield protocol.sse(APIError(event.status, event.message, kind=kind).body())
                    break
                choice = self.choices[index]
                choice.tokens += len(event.token_ids)
                choice.finish_reason = event.finish_reason
                logprobs = self._logprobs(choice, event)
                if chat:
                    # A content chunk for every token, except a last one with no text and nothing to report
                    # (the end-of-turn token): its finish chunk follows anyway.
                    if event.text or (event.token_ids and (not event.finished or logprobs is not None)):
                        yield protocol.sse(self._envelope([protocol.chat_delta(index, {"content": event.text}, None,
                                                                               logprobs)], chunk=True))
                    if event.finished:
                        yield protocol.sse(self._envelope([protocol.chat_delta(index, {}, event.finish_reason, None)],
                                                          chunk=True))
                elif event.text or event.token_ids or event.finished:
                    yield protocol.sse(self._envelope([protocol.completion_choice(index, event.text,
                                                                                  event.finish_reason, logprobs)],
                                                      chunk=True))
            else:
                self.outcome = self._finished_outcome()
                if self.parsed.include_usage:
                    yield protocol.sse(self._envelope([], chunk=True, usage=self._usage()))
            yield protocol.sse("[DONE]")
        finally:
            self.close()


class _EventStream(StreamingResponse):
    """A run's server-sent events. Closes the run however the response ends, also when the client went away
    before the stream's generator ever started (its own `finally` then never runs)."""

    def __init__(self, run: _Run):
        super().__init__(run.stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = (f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404
               else f"{exc.detail} ({request.method} {request.url.path})")
    return error_response(APIError(exc.status_code, message), headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception) -> Response:
    traceback.print_exception(exc, file=sys.stderr)
    return error_response(APIError(500, f"internal server error: {type(exc).__name__}", kind="server_error"))


def build_app(engine: EngineLoop, model: ServedModel, metrics: ServerMetrics, api_key: str | None) -> Starlette:
    """The ASGI application of one server."""
    r = Routes(engine, model, metrics, api_key)
    routes = [Route("/v1/completions", r.completions, methods=["POST"]),
              Route("/v1/chat/completions", r.chat_completions, methods=["POST"]),
              Route("/v1/models", r.models, methods=["GET"]),
              Route("/v1/models/{name:path}", r.retrieve_model, methods=["GET"]),
              Route("/health", r.health, methods=["GET"]),
              Route("/metrics", r.metrics_text, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})
