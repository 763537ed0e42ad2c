"""Quality table of the quantization methods on the bundled model (CPU, float32): held-out perplexity at context
512 on the last 25% of lee_background.cor, next-sentence choice accuracy, and size in MB (dense tensors as bf16).

Every row is measured on the same held-out tokens and the same choice items. The rows share one QuantContext, so
`auto` (last) reuses the measurements of the candidates already in the table, re-running only the one it chooses
(the context keeps measurements, not weights, so one process holds a few GiB whatever the number of rows).

    OMP_NUM_THREADS=1 python bench/quant_quality.py --eval-tokens 4096 --calib-tokens 4096 --choice-items 100 \
        --out bench/results/quant_quality-cpu-DATE.json
"""
import argparse
import json
import math
import time

from ringlet.checkpoint import load_checkpoint
from ringlet.choice import build, evaluate
from ringlet.quant import get_method, parse_method
from ringlet.quant.auto import DEFAULT_CANDIDATES
from ringlet.quant.calibration import load_calibration_text
from ringlet.quant.pipeline import QuantContext

ROWS = ["rtn-int8", "rtn-int4:group_size=128,sym=true", "rtn-int4:group_size=128,sym=false",
        "gptq:group_size=128", "gptq:group_size=128,sym=false", "awq:group_size=128", "bitnet",
        "rtn-int8:embeddings=int8", "gptq:group_size=128,embeddings=int8", "mixed:embeddings=int8", "auto"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--choice-items", type=int, default=100, help="first N items of the seed-0 next-sentence set")
    ap.add_argument("--rows", default=";;".join(ROWS), help="method specs separated by ';;'")
    ap.add_argument("--auto-candidates", default=";".join(DEFAULT_CANDIDATES),
                    help="the 'auto' row's candidates, ';'-separated")
    ap.add_argument("--no-choice", default="", help="';;'-separated rows whose choice accuracy is not measured")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ckpt = load_checkpoint("default")
    text = load_calibration_text()
    ctx = QuantContext(ckpt, text, args.calib_tokens, args.eval_tokens, 512)
    with open(text.source, encoding="utf-8") as f:
        items = build(f.read(), seed=0, items=args.choice_items)
    result = {"device": "cpu", "dtype": "float32", "context": 512, "eval_tokens": args.eval_tokens,
              "calib_tokens": args.calib_tokens, "choice_items": len(items),
              "choice_set": "next-sentence, lee_background.cor, seed 0 (python -m ringlet.choice build)", "rows": []}

    skip = set(filter(None, args.no_choice.split(";;")))

    def record(method: str, run, start: float) -> None:
        choice = {} if method in skip else evaluate(ctx.engine(run.weights, 1024), items).to_dict()
        errors = [r.error for r in run.plan if r.error is not None]
        row = {"method": method, "size_mb": run.size / 1e6, "perplexity": math.exp(run.loss),
               "relative_change": math.exp(run.loss - ctx.baseline().loss) - 1,
               "choice_accuracy": choice.get("accuracy"), "choice_accuracy_norm": choice.get("accuracy_norm"),
               "mean_layer_error": sum(errors) / len(errors) if errors else None,
               "group_sizes": sorted({r.group_size for r in run.plan if r.group_size}),
               "seconds": round(time.time() - start, 1)}
        row.update({k: v for k, v in run.report.items()
                    if k in ("chosen", "candidates", "budget_met", "promoted_layers", "measured")})
        result["rows"].append(row)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(row), flush=True)

    start = time.time()
    record("bf16 (reference)", ctx.baseline(), start)
    for spec in args.rows.split(";;"):
        start = time.time()
        method = get_method("auto", candidates=tuple(args.auto_candidates.split(";"))) if spec == "auto" \
            else parse_method(spec)
        record(spec, ctx.run(method), start)


if __name__ == "__main__":
    main()
