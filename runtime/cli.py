"""`python -m ringlet COMMAND`: a thin argparse layer over the Python API."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import ConfigError, RingletError
from .sampling_params import SamplingParams


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (bundled SmolLM2-135M-Instruct), a .gguf file "
                                                      "or an HF-style directory")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: the rank's GPU, else cpu)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--attention", default="dense",
                   help="attention pattern: dense, local:W, strided:S,W or block:B,local=L,stride=V, then per-layer "
                        "overrides ';I=PATTERN' (I from 0, negative from the end), e.g. 'local:256;0=dense;-1=dense'")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp8"],
                   help="KV cache dtype (auto: the model's; fp8: e4m3 pages with per-token scales)")
    p.add_argument("--rope-scaling", help="linear:F, ntk:F or yarn:F (stretches RoPE and the usable context F "
                                          "times), or none (default: the checkpoint's)")
    p.add_argument("--quant", help="quantize at load with a quick method: rtn-int8, rtn-int4[:group_size=G,sym=false] "
                                   "or bitnet (gptq/awq/mixed/auto: use the quantize command)")
    p.add_argument("--max-model-len", type=int, help="longest context to serve (default: the model's)")
    p.add_argument("--kv-cache-tokens", type=int, help="KV cache size in tokens (default: from free memory)")
    p.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="queue each decode step before the previous step's tokens reach the host, when its batch "
                        "is already known (default auto: on GPUs)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def async_scheduling(args) -> bool | None:
    """EngineConfig.async_scheduling from --async-scheduling."""
    return {"auto": None, "on": True, "off": False}[args.async_scheduling]


def _add_sampling_flags(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringlet", description="LLM inference on Triton kernels, over MPI.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="one completion, streamed")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, timings")
    _add_sampling_flags(gen, temperature=0.0)
    _add_model_flags(gen)
    from .replica_setup import add_rank_flags
    add_rank_flags(gen)  # `./launch.sh -n T generate --tp T`: one replica split over T ranks

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", help="system message")
    _add_sampling_flags(chat, temperature=0.7)
    _add_model_flags(chat)

    ev = sub.add_parser("eval", help="quality: perplexity over a text file, or multiple-choice accuracy")
    ev.add_argument("file", nargs="?", help="text file, or JSONL of choice items (or --data)")
    ev.add_argument("--data", help="text file, or JSONL of choice items")
    ev.add_argument("--metric", choices=["perplexity", "choice"], default="perplexity")
    ev.add_argument("--limit-items", type=int, help="choice: score only the first N items")
    ev.add_argument("--context", type=int, default=512, help="window length in tokens")
    ev.add_argument("--limit-tokens", type=int, help="score only the first N tokens of the file")
    ev.add_argument("--json", action="store_true", help="print only the JSON result")
    _add_model_flags(ev)

    q = sub.add_parser("quantize", help="write a quantized checkpoint with its measured quality")
    q.add_argument("--method", required=True, help="rtn-int8, rtn-int4, gptq, awq, bitnet, mixed or auto, "
                                                   "optionally with options: METHOD:key=value,...")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--bits", type=int, help="weight bits (4 for rtn-int4/gptq/awq)")
    q.add_argument("--group-size", type=int, help="int4 group size: 32, 64 or 128")
    q.add_argument("--sym", choices=["true", "false"], help="symmetric int4 grid (rtn-int4, gptq, awq)")
    q.add_argument("--budget", type=float, help="mixed/auto: allowed held-out perplexity increase (0.01 = +1%%)")
    q.add_argument("--embeddings", choices=["bf16", "int8"], help="token embedding / output head storage "
                                                                   "(default bf16; not for auto: per candidate)")
    q.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    q.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens measured (default 2048)")
    q.add_argument("--calib-file", help="calibration text (default: gensim's lee_background.cor)")
    q.add_argument("--model", default="default", help="the model to quantize")
    q.add_argument("--debug", action="store_true", help="show tracebacks")

    from .batch import add_parser as add_batch_parser
    add_batch_parser(sub, _add_model_flags, _add_sampling_flags)
    from .serve.command import add_parser as add_serve_parser
    add_serve_parser(sub, _add_model_flags)
    return parser


def _llm(args):
    from .api import LLM
    return LLM(args.model, attention=args.attention, kv_dtype=args.kv_dtype, rope_scaling=args.rope_scaling,
               device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, quant=args.quant,
               kv_cache_tokens=args.kv_cache_tokens, async_scheduling=async_scheduling(args))


def _params(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop)


def cmd_generate(args) -> int:
    from ringlet.mpi.ranks import discover
    params = _params(args)
    info = discover()
    if info.world_size > 1 and args.tp > 1:
        return _generate_on_ranks(args, params, info)
    # (MPI is not touched here: ranks other than 0 have already left, and an MPI start would wait for them.)
    if args.tp != 1:
        raise ConfigError(f"--tp {args.tp} needs {args.tp} ranks: `./launch.sh -n {args.tp} generate --tp {args.tp} ...`")
    if args.dp not in (None, 1):
        raise ConfigError(f"generate runs one prompt on one replica, so --dp must be 1, got {args.dp}")
    llm = _llm(args)
    return _generate(args, params, llm, _prompt(args, llm))


def _prompt(args, llm) -> str:
    """--prompt, in the chat template with --chat; RequestError if the model cannot take it."""
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    llm.engine.encode(prompt)
    return prompt


def _generate_on_ranks(args, params: SamplingParams, info) -> int:
    """generate with its model split over every rank (--tp = ranks): rank 0 runs the engine and prints, the
    others replay its plans on their shards. Bad flags or a bad prompt end every rank with one error line."""
    from .api import LLM
    from .replica_setup import run_on_ranks

    def prepare(layout, replica):
        if layout.dp != 1:
            raise ConfigError(f"generate runs one prompt on one replica, so --dp must be 1, got {layout.dp} "
                              f"(start it as `./launch.sh -n {info.world_size} generate --tp {info.world_size}`)")
        if info.rank != 0:
            return None
        llm = LLM.from_engine(replica.engine)
        return llm, _prompt(args, llm)

    def work(layout, replica, messages, state):
        if info.rank == 0:
            _generate(args, params, *state)
            replica.stop_workers()
        else:
            replica.serve_plans()

    return 0 if run_on_ranks(args, info, prepare, work) is not None else 1


def _generate(args, params: SamplingParams, llm, prompt: str) -> int:
    start = time.perf_counter()
    first = None
    token_ids: list[int] = []
    text = []
    finish = None
    for chunk in llm.stream(prompt, params):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        token_ids += chunk.token_ids
        text.append(chunk.text)
        finish = chunk.finish_reason
        if not args.json:
            print(chunk.text, end="", flush=True)
    end = time.perf_counter()
    decode_s = end - (first or end)
    timings = {"time_to_first_token_s": round((first or end) - start, 4), "total_s": round(end - start, 4),
               "decode_tokens_per_s": round((len(token_ids) - 1) / decode_s, 2) if decode_s > 0 else None}
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": token_ids,
                          "prompt_token_ids": llm.engine.encode(prompt), "finish_reason": finish,
                          "timings": timings, "info": llm.engine.info()}))
    else:
        print()
    return 0


def cmd_chat(args) -> int:
    params = _params(args)
    llm = _llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = []
        for chunk in llm.stream(llm.tokenizer.apply_chat_template(messages), params):
            print(chunk.text, end="", flush=True)
            reply.append(chunk.text)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_eval(args) -> int:
    from .evaluate import perplexity
    path = args.data or args.file
    if not path:
        raise RingletError("eval needs a text file (positional FILE or --data FILE)")
    if args.metric == "choice":
        return _eval_choice(args, path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise RingletError(f"cannot read {path}: {e}") from None
    llm = _llm(args)
    start = time.perf_counter()
    result = perplexity(llm.engine, text, args.context, args.limit_tokens).to_dict()
    result.update(metric=args.metric, file=path, model=args.model, seconds=round(time.perf_counter() - start, 2),
                  **llm.engine.info())
    if not args.json:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens_scored']} tokens "
              f"({result['windows']} windows of {args.context})", file=sys.stderr)
    print(json.dumps(result))
    return 0


def _eval_choice(args, path: str) -> int:
    from .choice import evaluate, read_items
    items = read_items(path)[:args.limit_items]
    llm = _llm(args)
    start = time.perf_counter()
    result = evaluate(llm.engine, items).to_dict()
    result.update(metric="choice", file=path, model=args.model, quant=args.quant,
                  seconds=round(time.perf_counter() - start, 2))
    if not args.json:
        print(f"accuracy {result['accuracy']:.4f} (per-byte normalised {result['accuracy_norm']:.4f}) over "
              f"{result['items']} items, chance {result['chance']:.2f}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def cmd_quantize(args) -> int:
    from .checkpoint import load_checkpoint
    from .quant import get_method, parse_method, quantize_model, save_quantized
    spec = parse_method(args.method)
    options = {k: v for k, v in spec.to_dict().items() if k != "method"}
    flags = {"bits": args.bits, "group_size": args.group_size, "budget": args.budget, "embeddings": args.embeddings,
             "sym": None if args.sym is None else args.sym == "true"}
    method = get_method(spec.name, **{**options, **{k: v for k, v in flags.items() if v is not None}})
    checkpoint = load_checkpoint(args.model)
    qm = quantize_model(checkpoint, method, args.calib_file, args.calib_tokens, args.eval_tokens)
    save_quantized(qm, checkpoint, args.out)
    q = qm.quality
    print(json.dumps({"out": args.out, "method": qm.method, **{k: v for k, v in q.items() if k != "sensitivity"}}))
    return 0


def cmd_batch(args) -> int:
    from .batch import cmd_batch as run
    return run(args)


def cmd_serve(args) -> int:
    from .serve.command import cmd_serve as run
    return run(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval, "quantize": cmd_quantize,
            "batch": cmd_batch, "serve": cmd_serve}
# Commands every rank runs (they split the work over MPI); the others run on rank 0 alone (generate too, unless its
# model is split with --tp).
MULTI_RANK = {"batch", "serve"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ringlet.mpi.ranks import discover
        every_rank = args.command in MULTI_RANK or (args.command == "generate" and args.tp > 1)  # --tp: a split model
        if not every_rank and discover().rank != 0:
            return 0  # multi-rank work arrives with tensor/data parallelism; other ranks have nothing to do yet
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except RingletError as e:
        if args.debug:
            raise
        print(f"ringlet: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or a broken MPI set-up, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(f"ringlet: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
