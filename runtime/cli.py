"""`python -m ringlet COMMAND`: a thin argparse layer over the Python API."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import RingletError
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
    p.add_argument("--max-model-len", type=int, help="longest context to serve (default: the model's)")
    p.add_argument("--kv-cache-tokens", type=int, help="KV cache size in tokens (default: from free memory)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


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

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", help="system message")
    _add_sampling_flags(chat, temperature=0.7)
    _add_model_flags(chat)

    ev = sub.add_parser("eval", help="quality: perplexity over a text file")
    ev.add_argument("file", nargs="?", help="text file (or --data)")
    ev.add_argument("--data", help="text file")
    ev.add_argument("--metric", choices=["perplexity"], default="perplexity")
    ev.add_argument("--context", type=int, default=512, help="window length in tokens")
    ev.add_argument("--limit-tokens", type=int, help="score only the first N tokens of the file")
    ev.add_argument("--json", action="store_true", help="print only the JSON result")
    _add_model_flags(ev)
    return parser


def _llm(args):
    from .api import LLM
    return LLM(args.model, attention=args.attention, kv_dtype=args.kv_dtype, rope_scaling=args.rope_scaling,
               device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
               kv_cache_tokens=args.kv_cache_tokens)


def _params(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop)


def cmd_generate(args) -> int:
    params = _params(args)
    llm = _llm(args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
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


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ringlet.mpi.ranks import discover
        if discover().rank != 0:
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
