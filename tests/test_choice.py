"""The next-sentence choice set (built from lee_background.cor) and HellaSwag-style scoring."""
import json

import pytest

from ringlet.choice import build, evaluate, read_items
from ringlet.errors import RequestError


def test_build_is_deterministic_and_keeps_the_true_next_sentence(lee_path):
    text = open(lee_path, encoding="utf-8").read()
    items = build(text, seed=0)
    assert items == build(text, seed=0) and items != build(text, seed=1)
    assert len(items) > 250
    for item in items[:20]:
        assert len(item["options"]) == 4 and len(set(item["options"])) == 4
        assert item["options"][item["label"]] in text.splitlines()[item["article"]]
        assert sum(o in text.splitlines()[item["article"]] for o in item["options"]) == 1


def test_scoring_prefers_the_obvious_continuation(llm):
    item = {"context": "One, two, three, four,", "options": ["five, six, seven.", "purple elephants dance slowly."],
            "label": 0}
    res = evaluate(llm.engine, [item, dict(item, options=item["options"][::-1], label=1)])
    assert res.accuracy == 1.0 and res.items == 2 and res.chance == 0.5


def test_bad_items_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": "a", "options": ["b", "c"], "label": 0}) + "\n"
                    + json.dumps({"context": "a", "options": ["b"], "label": 3}) + "\n")
    with pytest.raises(RequestError, match=f"{path}:2"):
        read_items(str(path))


def test_cli_eval_choice_and_builder(tmp_path, capsys):
    """Both command lines, in-process (no interpreter start-up): build 2 items, score the first."""
    from ringlet.choice import main as choice_main
    from ringlet.cli import main as cli_main
    out = tmp_path / "ns.jsonl"
    assert choice_main(["build", "--out", str(out), "--items", "2"]) == 0
    assert len(read_items(str(out))) == 2
    capsys.readouterr()
    assert cli_main(["eval", "--metric", "choice", str(out), "--json", "--limit-items", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["items"] == 1 and res["accuracy"] in (0.0, 1.0)
