"""Perplexity of the bundled model on gensim's Lee corpus against the independent float32 figure (30.85)."""
import json
import subprocess
import sys

from ringlet.evaluate import perplexity


def test_perplexity_windows_are_non_overlapping(llm):
    text = "The cat sat on the mat. " * 20
    ids = llm.tokenizer.encode(text)
    res = perplexity(llm.engine, text, context=16)
    assert res.windows == -(-len(ids) // 16)
    assert res.tokens_scored == len(ids) - res.windows


def test_lee_corpus_perplexity_matches_the_reference_figure(lee_path):
    out = subprocess.run([sys.executable, "-m", "ringlet", "eval", "--metric", "perplexity", "--context", "512",
                          "--limit-tokens", "16384", "--json", "--data", lee_path],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["tokens_scored"] == 16384 - 32
    assert abs(res["perplexity"] - 30.85) / 30.85 < 0.005, res
