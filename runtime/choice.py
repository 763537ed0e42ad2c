"""Multiple-choice accuracy (HellaSwag-style scoring) and a next-sentence discrimination set built from real text.

Scoring: for each item, the log-likelihood of every option given the context (Engine.score over context + " " +
option); the prediction is the option with the highest total log-likelihood (`accuracy`) and with the highest
log-likelihood per byte of option text (`accuracy_norm`, as lm-eval's acc_norm).

The set (`build`): NOT HellaSwag. From gensim's lee_background.cor (one news article per line): for each article
with at least 3 sentences, a random sentence position i >= 1 (seeded); context = sentences i-1 and i; options =
the true next sentence i+1 plus 3 sentences drawn from other articles; options shuffled. Chance is 25%.

    python -m ringlet.choice build --out next_sentence.jsonl [--seed 0] [--items N]
    python -m ringlet eval --metric choice next_sentence.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import asdict, dataclass

from .errors import RequestError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(article: str) -> list[str]:
    """An article's sentences (split after . ! ? before a capital or quote; very short pieces dropped)."""
    return [s.strip() for s in _SENTENCE_END.split(article.strip()) if len(s.strip()) >= 20]


def build(text: str, seed: int = 0, n_options: int = 4, items: int | None = None) -> list[dict]:
    """Items {"context", "options", "label", "article"} from `text` (one article per line), as described above."""
    articles = [sentences(line) for line in text.splitlines() if line.strip()]
    rng = random.Random(seed)
    out = []
    for a, sents in enumerate(articles):
        if len(sents) < 3:
            continue
        i = rng.randrange(1, len(sents) - 1)
        others = [b for b in range(len(articles)) if b != a and articles[b]]
        distractors = [rng.choice(articles[b]) for b in rng.sample(others, n_options - 1)]
        options = [sents[i + 1], *distractors]
        order = list(range(n_options))
        rng.shuffle(order)
        out.append({"context": f"{sents[i - 1]} {sents[i]}", "options": [options[j] for j in order],
                    "label": order.index(0), "article": a})
    return out[:items] if items is not None else out


@dataclass
class ChoiceResult:
    accuracy: float
    accuracy_norm: float
    items: int
    chance: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_items(path: str) -> list[dict]:
    """Items of a JSONL file; RequestError naming the file and line for a malformed item."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"cannot read {path}: {e}") from None
    items = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}:{n}: not JSON ({e})") from None
        ok = (isinstance(item, dict) and isinstance(item.get("context"), str) and isinstance(item.get("options"), list)
              and len(item["options"]) >= 2 and all(isinstance(o, str) and o for o in item["options"])
              and isinstance(item.get("label"), int) and 0 <= item["label"] < len(item["options"]))
        if not ok:
            raise RequestError(f"{path}:{n}: an item needs 'context' (string), 'options' (>= 2 non-empty strings) "
                               f"and 'label' (index of the right option)")
        items.append(item)
    if not items:
        raise RequestError(f"{path}: no items")
    return items


def evaluate(engine, items: list[dict]) -> ChoiceResult:
    """Accuracy of `engine` on `items` (see module docstring)."""
    tok = engine.tokenizer
    right = right_norm = 0
    chance = 0.0
    for item in items:
        ctx = tok.encode(item["context"])
        totals, per_byte = [], []
        for option in item["options"]:
            ids = tok.encode(" " + option, add_bos=False)
            lp = engine.score(ctx + ids)[len(ctx) - 1:]
            totals.append(float(lp.double().sum()))
            per_byte.append(totals[-1] / len(option.encode("utf-8")))
        right += max(range(len(totals)), key=totals.__getitem__) == item["label"]
        right_norm += max(range(len(per_byte)), key=per_byte.__getitem__) == item["label"]
        chance += 1 / len(item["options"])
    n = len(items)
    return ChoiceResult(right / n, right_norm / n, n, chance / n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ringlet.choice", description="build a next-sentence choice set")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="next-sentence discrimination set from lee_background.cor")
    b.add_argument("--out", required=True)
    b.add_argument("--text", help="one article per line (default: gensim's lee_background.cor)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--items", type=int)
    args = ap.parse_args(argv)
    from .quant.calibration import lee_corpus_path
    with open(args.text or lee_corpus_path(), encoding="utf-8") as f:
        items = build(f.read(), args.seed, items=args.items)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    print(f"wrote {len(items)} items to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
