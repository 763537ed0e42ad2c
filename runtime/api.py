"""The Python API: `LLM(model).generate(prompts, params)` and `LLM(model).stream(prompt, params)`."""
from __future__ import annotations

from typing import Iterator, Sequence as Seq

from .engine import Engine, EngineConfig
from .errors import ConfigError, RequestError
from .outputs import CompletionOutput, StreamChunk
from .sampling_params import SamplingParams


class LLM:
    """A model ready to generate.

    `model` is "default" (the bundled SmolLM2-135M-Instruct), a GGUF file or an HF-style directory. Options are
    EngineConfig's fields: `attention` (a pattern string: "dense", "local:256", "strided:64,256",
    "block:16,local=4,stride=8", with per-layer overrides such as "local:256;0=dense;-1=dense"), `kv_dtype`
    ("auto", "bf16", "fp16", "fp32", "fp8"), `rope_scaling` ("linear:4", "ntk:4", "yarn:4", "none"), and the
    sizing ones (device, dtype, max_model_len, kv_cache_tokens, max_num_seqs, max_num_batched_tokens, cuda_graphs,
    async_scheduling, seed). A bad value raises ConfigError naming it.
    """

    def __init__(self, model: str = "default", **engine_options):
        unknown = set(engine_options) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown LLM option(s): {', '.join(sorted(unknown))}")
        self.engine = Engine.from_path(model, EngineConfig(**engine_options))
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine(cls, engine: Engine) -> "LLM":
        """An LLM over an engine built elsewhere (a tensor-parallel replica's: ringlet.mpi.parallel.Replica)."""
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer = engine, engine.tokenizer
        return llm

    def generate(self, prompts: str | Seq[str] | Seq[list[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[CompletionOutput]:
        """Complete every prompt (continuously batched) and return the outputs in prompt order.

        Every prompt is queued before any step runs: a bad one raises RequestError naming its index, and none of
        the prompts runs.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = self._params_list(params, len(prompts))
        ids: list[str] = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params_list)):
                try:
                    ids.append(self.engine.add_request(prompt, sp))
                except RequestError as e:
                    raise RequestError(f"prompt {i}: {e}") from None
            while any(self.engine.is_unfinished(i) for i in ids):
                self.engine.step()
        except BaseException:
            for i in ids:  # a refused prompt or an interrupt: none of this call's requests stays behind
                self.engine.abort(i)
                self.engine.pop_finished(i)
            raise
        return [self.engine.pop_finished(i) for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Yield StreamChunks (new text and token ids) as they are generated; the last has a finish_reason.

        Other requests queued on the same engine keep running while this one streams.
        """
        request_id = self.engine.add_request(prompt, params)
        try:
            while True:
                for chunk in self.engine.step():
                    if chunk.request_id == request_id:
                        yield chunk
                        if chunk.finished:
                            self.engine.pop_finished(request_id)
                            return
        finally:
            self.engine.abort(request_id)
            self.engine.pop_finished(request_id)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> CompletionOutput:
        """Apply the model's chat template to `messages` ([{"role": ..., "content": ...}]) and complete it."""
        return self.generate([self.tokenizer.apply_chat_template(messages)], params)[0]

    @staticmethod
    def _params_list(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise RequestError(f"got {len(params)} SamplingParams for {n} prompts")
        return params
