"""CPU decode speed of the bundled model: ringlet against HF transformers (float32, same GGUF), same process.

Batch 1, greedy, a short prompt, --new tokens; decode tokens/s counts tokens after the first (prefill excluded).
    python bench/cpu_decode.py [--threads 2] [--new 64] [--out bench/results/cpu_decode-<date>.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from ringlet import LLM, SamplingParams
from ringlet.checkpoint import default_model_path

PROMPT = "The history of the city begins with"


def ringlet_decode(llm: LLM, new: int) -> float:
    first = None
    n = 0
    for chunk in llm.stream(PROMPT, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)):
        if first is None:
            first = time.perf_counter()
        n += len(chunk.token_ids)
    return (n - 1) / (time.perf_counter() - first)


def hf_decode(model, prompt_ids: list[int], new: int) -> float:
    """transformers' own generate loop (KV cache on); decode rate from the time of `new` tokens minus one."""
    ids = torch.tensor([prompt_ids])

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - start

    return (new - 1) / (run(new) - run(1))


def main() -> None:
    import transformers
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM("default", device="cpu")
    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           torch_dtype=torch.float32).eval()
    prompt_ids = llm.tokenizer.encode(PROMPT)
    ringlet_decode(llm, 8)
    hf_decode(hf, prompt_ids, 8)
    ours = max(ringlet_decode(llm, args.new) for _ in range(args.repeats))
    theirs = max(hf_decode(hf, prompt_ids, args.new) for _ in range(args.repeats))
    res = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
           "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
           "new_tokens": args.new, "ringlet_tok_s": round(ours, 2), "transformers_tok_s": round(theirs, 2),
           "ratio": round(ours / theirs, 3)}
    out = args.out or f"bench/results/cpu_decode-{res['date']}.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
