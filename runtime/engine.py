"""The continuous-batching engine: requests in, streamed tokens out, one scheduler step at a time."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from .attention import check_attention_spec, format_attention, parse_attention
from .checkpoint import Checkpoint, load_checkpoint
from .config import ModelConfig, RopeScaling, parse_rope_scaling
from .errors import ConfigError, RequestError
from .kv_cache import FP8, PAGE_SIZE, KVCache
from .model import Llama
from .model_runner import ModelRunner
from .outputs import CompletionOutput, StreamChunk
from .sampler import TokenReadback, sample_tokens, token_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class EngineConfig:
    """Engine sizing and model options. None means: choose from the device or the checkpoint (see `Engine`).

    attention: a pattern string for `attention.parse_attention` ("dense", "local:256", "local:256;0=dense", ...).
    kv_dtype: "auto" (the model's dtype), "bf16", "fp16", "fp32" or "fp8" (e4m3 pages with per-token scales).
    rope_scaling: None (the checkpoint's own), "none", or "TYPE:FACTOR" for `config.parse_rope_scaling`
    (linear:4, ntk:4, yarn:4), which also raises the usable context to factor x the trained context.
    quant: None, or a quick quantization method applied at load ("rtn-int8", "rtn-int4:group_size=64,sym=false",
    "bitnet"); calibrated methods (gptq, awq, mixed, auto) go through `python -m ringlet quantize`.
    async_scheduling: queue a decode step before the previous step's tokens reach the host, whenever its batch
    is already known (`Engine.step`); None: on for CUDA devices (on the CPU there is nothing to overlap).
    """

    device: str | None = None
    dtype: str | None = None
    attention: str = "dense"
    kv_dtype: str = "auto"
    rope_scaling: str | RopeScaling | None = None
    quant: str | None = None
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    cuda_graphs: bool = True
    async_scheduling: bool | None = None
    seed: int = 0


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    """The caller's device, else this process's current CUDA device when there is one, else the CPU."""
    if name is not None:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ConfigError(f"device {name!r} is not a torch device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_KV_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
              "fp32": torch.float32, "float32": torch.float32, "fp8": FP8, "float8_e4m3fn": FP8}


def _kv_dtype_named(name: str) -> torch.dtype | None:
    """The dtype a kv_dtype name stands for (None for "auto"); ConfigError for any other name."""
    if name == "auto":
        return None
    if name not in _KV_DTYPES:
        raise ConfigError(f"kv_dtype {name!r} is not one of auto, {', '.join(_KV_DTYPES)}")
    return _KV_DTYPES[name]


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache dtype: the model's for "auto", else one of _KV_DTYPES. A 16/32-bit cache must match the
    model's dtype (the kernels read the cache in the queries' dtype); FP8 goes with any."""
    dtype = _kv_dtype_named(name)
    if dtype is None:
        return model_dtype
    if dtype != FP8 and dtype != model_dtype:
        raise ConfigError(f"kv_dtype {name!r} differs from the model dtype {str(model_dtype).removeprefix('torch.')}: "
                          f"a 16/32-bit KV cache is kept in the model's dtype (set dtype to match, or use fp8)")
    return dtype


def check_engine_config(cfg: EngineConfig) -> None:
    """The checks of `Engine` that need no checkpoint, made before one is loaded so that a bad option fails at
    once (loading a 13B model takes minutes): the device, dtype and KV dtype names, the attention string and the
    RoPE scaling string (their syntax and values), the quantization method and max_num_seqs. What depends on the
    model (layer indices, contexts, the KV dtype matching the model's) is checked by `Engine` itself, which also
    repeats every check here on its own (an Engine built from a checkpoint in hand needs no separate call)."""
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    _kv_dtype_named(cfg.kv_dtype)
    check_attention_spec(cfg.attention)
    if isinstance(cfg.rope_scaling, str):
        parse_rope_scaling(cfg.rope_scaling, 1)  # a stand-in trained context: only `original` depends on it
    if cfg.quant is not None:
        from .quant import parse_method
        parse_method(cfg.quant)
    _check_max_num_seqs(cfg)


def _check_max_num_seqs(cfg: EngineConfig) -> None:
    if cfg.max_num_seqs < 1:
        raise ConfigError(f"max_num_seqs must be >= 1, got {cfg.max_num_seqs}")


def apply_rope_scaling(config: ModelConfig, spec: str | RopeScaling | None) -> ModelConfig:
    """The model config with the caller's RoPE scaling in place of the checkpoint's (None keeps the checkpoint's)."""
    if spec is None:
        return config
    if isinstance(spec, RopeScaling):
        return config.with_rope_scaling(spec)
    trained = config.rope_scaling.original_max_position if config.rope_scaling is not None else config.max_seq_len
    return config.with_rope_scaling(parse_rope_scaling(spec, trained))


def check_context(config: ModelConfig, max_model_len: int) -> None:
    """Raise ConfigError when max_model_len is beyond the positions the model's RoPE settings allow."""
    if max_model_len <= config.max_context:
        return
    scaling = config.rope_scaling
    if scaling is None:
        raise ConfigError(f"max_model_len {max_model_len} exceeds the model's trained context {config.max_seq_len}; "
                          f"positions beyond it need rope scaling (e.g. rope_scaling='yarn:"
                          f"{-(-max_model_len // config.max_seq_len)}', CLI --rope-scaling)")
    raise ConfigError(f"max_model_len {max_model_len} exceeds the {config.max_context} positions rope scaling "
                      f"{scaling.spec()} allows ({scaling.factor:g} x trained context "
                      f"{scaling.original_max_position})")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs and float32 on the CPU unless the caller names one of _DTYPES."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def encode_prompt(tokenizer, prompt: str | list[int], vocab_size: int, max_model_len: int) -> list[int]:
    """Token ids of a prompt (a string for `tokenizer`, which may be None, or token ids below vocab_size); raises
    RequestError for an empty prompt or one that leaves no room in max_model_len for a generated token."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty")
        if tokenizer is None:
            raise RequestError("this model has no tokenizer: pass the prompt as token ids")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    else:
        raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise RequestError("prompt is empty")
    if len(ids) >= max_model_len:
        raise RequestError(f"prompt is {len(ids)} tokens but the context holds {max_model_len} "
                           "(including at least one generated token)")
    return ids


class Engine:
    """Holds the model, the KV cache and the scheduler; `step()` advances every running request by one step."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None,
                 shard: Callable[[Llama], Llama] | None = None):
        """`shard`, when given, is called with the built model and returns the part this rank runs (tensor
        parallel: `ringlet.mpi.tp.apply_tp`); the KV cache then holds that model's (local) KV heads."""
        cfg = config or EngineConfig()
        self.config = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.kv_dtype = resolve_kv_dtype(cfg.kv_dtype, self.dtype)
        self.model_config = apply_rope_scaling(checkpoint.config, cfg.rope_scaling)
        if cfg.max_model_len is not None:
            check_context(self.model_config, cfg.max_model_len)
        patterns = parse_attention(cfg.attention, self.model_config.n_layers)
        _check_max_num_seqs(cfg)
        self.tokenizer = checkpoint.tokenizer
        weights = checkpoint.weights
        if cfg.quant is not None:
            from .quant import parse_method, quantize_at_load
            weights = quantize_at_load(weights, self.model_config, parse_method(cfg.quant))
        self.model = Llama(self.model_config, weights, self.device, self.dtype, patterns)
        if shard is not None:
            self.model = shard(self.model)
        self.kv = KVCache(self.model.config, self._num_pages(cfg), self.kv_dtype, self.device)
        self.max_model_len = min(cfg.max_model_len or self.model_config.max_context, self.kv.capacity_tokens)
        batched = cfg.max_num_batched_tokens or (2048 if self.device.type == "cuda" else 512)
        if batched < cfg.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens ({batched}) must be >= max_num_seqs ({cfg.max_num_seqs})")
        self.scheduler = Scheduler(self.kv.allocator, self.kv.page_size, cfg.max_num_seqs, batched)
        self.runner = ModelRunner(self.model, self.kv, self.max_model_len, cfg.max_num_seqs,
                                  cuda_graphs=cfg.cuda_graphs and self.device.type == "cuda")
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed)
        self.async_scheduling = cfg.async_scheduling if cfg.async_scheduling is not None \
            else self.device.type == "cuda"
        self._readback = TokenReadback(cfg.max_num_seqs, self.device)
        # A decode step queued ahead and not collected yet: (its sequences, their sampled tokens on the device).
        self._ahead: tuple[list[Sequence], torch.Tensor] | None = None
        self.steps_ahead = 0  # decode steps queued ahead so far (for monitoring and tests)
        self._sequences: dict[str, Sequence] = {}
        self._finished: dict[str, CompletionOutput] = {}
        self._arrivals = itertools.count()

    @classmethod
    def from_path(cls, path: str, config: EngineConfig | None = None) -> "Engine":
        """An engine over the checkpoint at `path` (see `load_checkpoint`), the options checked before loading it."""
        config = config or EngineConfig()
        check_engine_config(config)
        return cls(load_checkpoint(path), config)

    def _num_pages(self, cfg: EngineConfig) -> int:
        per_token = KVCache.bytes_per_token(self.model.config, self.kv_dtype)
        if cfg.kv_cache_tokens is not None:
            tokens = cfg.kv_cache_tokens
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = free - (1 - cfg.gpu_memory_utilization) * total
            tokens = int(budget // per_token)
        else:
            tokens = max(16384, cfg.max_model_len or 0)
        if tokens < PAGE_SIZE:
            raise ConfigError(f"KV cache of {tokens} tokens is smaller than one page ({PAGE_SIZE} tokens)")
        return tokens // PAGE_SIZE

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes over all layers (an FP8 cache's scales included)."""
        return KVCache.bytes_per_token(self.model.config, self.kv_dtype)

    def info(self) -> dict:
        """What this engine runs with, for reports: attention patterns, KV dtype and bytes per token, RoPE."""
        scaling = self.model_config.rope_scaling
        return {"attention": format_attention([a.pattern for a in self.model.attention]),
                "dtype": str(self.dtype).removeprefix("torch."), "kv_dtype": str(self.kv_dtype).removeprefix("torch."),
                "kv_bytes_per_token": self.kv_bytes_per_token, "kv_cache_tokens": self.kv.capacity_tokens,
                "max_model_len": self.max_model_len, "trained_context": self.model_config.max_seq_len,
                "rope_scaling": scaling.spec() if scaling is not None else None}

    # -- requests -------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises RequestError (queuing nothing) for a request that cannot run."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        prompt_ids = self.encode(prompt)
        arrival = next(self._arrivals)
        request_id = str(arrival) if request_id is None else str(request_id)
        if request_id in self._sequences:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt if isinstance(prompt, str) else None, prompt_ids, params, arrival,
                       self.tokenizer, self.max_model_len, self.device)
        self._sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context length."""
        return encode_prompt(self.tokenizer, prompt, self.model_config.vocab_size, self.max_model_len)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its pages; unknown or finished ids are ignored."""
        seq = self._sequences.pop(request_id, None)
        if seq is not None:
            seq.abort()
            self.scheduler.remove(seq)
            self._finished[request_id] = seq.to_output()

    def is_unfinished(self, request_id: str) -> bool:
        return request_id in self._sequences

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def pop_finished(self, request_id: str) -> CompletionOutput | None:
        """The completed output of a finished request (once), or None while it is still running."""
        return self._finished.pop(request_id, None)

    # -- stepping -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StreamChunk]:
        """Run one scheduler step; returns the new output of every request that produced any.

        With async scheduling, once a step's tokens are sampled on the device and their copy to the host is
        queued, the next decode step is queued too when its batch does not depend on those tokens (`_rows_ahead`),
        taking its input tokens straight from the device; the next call collects that step instead of scheduling
        one. The GPU then runs the two back to back while the host reads tokens, detokenizes and checks stops. A
        sequence that finished in between (a stop token, a stop string, an abort) gets no token from it.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None and any(not s.finished for s in ahead[0]):
            (samplers, tokens), logits = ahead, None
        else:
            samplers, tokens, logits = self._launch(self.scheduler.schedule())
            if not samplers:
                return []
        self._readback.start(tokens)
        rows = self._rows_ahead(samplers)
        if rows is not None:
            self._queue_ahead(samplers, tokens, rows)
        token_list = self._readback.wait()
        logprobs = token_logprobs(logits, tokens, token_list, [s.params for s in samplers]) \
            if logits is not None else [None] * len(samplers)
        chunks = []
        for seq, tok, lp in zip(samplers, token_list, logprobs):
            if seq.finished:  # finished while this step was queued ahead of it
                continue
            seq.append_token(tok, lp)
            chunk = seq.take_chunk()
            if chunk is not None:
                chunks.append(chunk)
            if seq.finished:
                self.scheduler.remove(seq)
                del self._sequences[seq.request_id]
                self._finished[seq.request_id] = seq.to_output()
        return chunks

    def _launch(self, plan) -> tuple[list[Sequence], torch.Tensor | None, torch.Tensor | None]:
        """Run a scheduled step's forwards and queue its sampling: (the sequences that get a token, their tokens
        [n] int64 on the device, their logits [n, vocab] float32); ([], None, None) when none does."""
        samplers: list[Sequence] = []
        logits = []
        if plan.decode:
            logits.append(self.runner.decode(plan.decode))
            samplers += plan.decode
        if plan.prefill:
            prefill_logits = self.runner.prefill(plan.prefill)
            done = [i for i, (seq, n) in enumerate(plan.prefill) if seq.num_computed + n == seq.num_tokens]
            logits.append(prefill_logits[done])
            samplers += [plan.prefill[i][0] for i in done]
        for seq in plan.decode:
            seq.num_computed += 1
        for seq, n in plan.prefill:
            seq.num_computed += n
        if not samplers:
            return [], None, None
        rows = torch.cat(logits) if len(logits) > 1 else logits[0]
        return samplers, self._sample(samplers, rows), rows

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        return sample_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs], self.generator)

    def _rows_ahead(self, samplers: list[Sequence]) -> list[int] | None:
        """Which of samplers (whose tokens are still on the device) decode in a step queued now, before those
        tokens are read; None when the next step must wait for them: a sequence part-way through its prompt, an
        arrival that a slot freed by a length limit would admit, logprobs (read from the logits), no free page
        for a sequence that needs one. Sequences that reach max_tokens or the context with this token sit out."""
        if not self.async_scheduling or any(s.params.logprobs is not None for s in samplers):
            return None
        if self.model.comm is not None and self.model_config.vocab_size > 1 << 24:
            return None  # the tokens would not cross the group exactly (ModelRunner._shared_tokens)
        live = [s for s in samplers if not s.finished]
        if len(live) != len(self.scheduler.running):
            return None
        rows = [i for i, s in enumerate(samplers) if not s.finished and not self._last_token_next(s)]
        if not rows or (self.scheduler.waiting and len(rows) < self.scheduler.max_num_seqs):
            return None
        if not self.scheduler.reserve_ahead([samplers[i] for i in rows]):
            return None
        return rows

    @staticmethod
    def _last_token_next(seq: Sequence) -> bool:
        """Whether the token seq is about to receive ends it by length (max_tokens, or the context)."""
        return (seq.num_tokens + 1 - len(seq.prompt_ids) >= seq.params.max_tokens
                or seq.num_tokens + 1 >= seq.max_model_len)

    def _queue_ahead(self, samplers: list[Sequence], tokens: torch.Tensor, rows: list[int]) -> None:
        """Queue the decode step of samplers[rows], its input tokens the device's tokens[rows], and its sampling."""
        seqs = [samplers[i] for i in rows]
        if len(rows) < len(samplers):
            tokens = tokens[torch.tensor(rows).to(tokens.device, non_blocking=True)]  # no wait for the stream
        logits = self.runner.decode(seqs, tokens)
        for seq in seqs:
            seq.num_computed += 1
        self._ahead = (seqs, self._sample(seqs, logits))
        self.steps_ahead += 1

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Log-probabilities [len-1] float32 (CPU) of token_ids[1:] each given the tokens before it.

        Runs as a temporary sequence in chunks of the step budget; needs free pages for the whole text.
        """
        if len(token_ids) < 2:
            raise RequestError("scoring needs at least 2 tokens")
        if len(token_ids) > self.max_model_len:
            raise RequestError(f"cannot score {len(token_ids)} tokens: the context holds {self.max_model_len}")
        seq = Sequence("score", None, token_ids, SamplingParams(), -1, self.tokenizer, self.max_model_len,
                       self.device)
        pages = self.kv.allocator.allocate(self.kv.pages_needed(len(token_ids)))
        if pages is None:
            raise RequestError("not enough free KV cache pages to score this text now")
        seq.pages = pages
        out = []
        try:
            chunk = self.scheduler.max_num_batched_tokens
            while seq.num_computed < len(token_ids):
                n = min(chunk, len(token_ids) - seq.num_computed)
                logits = self.runner.prefill([(seq, n)], all_logits=True)
                targets = torch.tensor(token_ids[seq.num_computed + 1:seq.num_computed + n + 1], device=self.device)
                lp = torch.log_softmax(logits[:len(targets)], dim=-1)
                out.append(lp.gather(1, targets.unsqueeze(1)).squeeze(1).cpu())
                seq.num_computed += n
        finally:
            self.kv.allocator.free(pages)
        return torch.cat(out)
