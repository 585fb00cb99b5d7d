"""experiments/multilingual_eval.py: scores written after every task, a rerun of the same command
skips what is scored, and a file of another model's scores is refused and left as it is."""
import json

import pytest

from conftest import load_script

pytest.importorskip("bm25s")


def _bitext_task(folder, language, pairs):
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"type": "bitext_mining", "name": f"Tiny.{language}",
                                                  "language": language}))
    with open(folder / "test.jsonl", "w") as f:
        for a, b in pairs:
            f.write(json.dumps({"sentence1": a, "sentence2": b}) + "\n")


@pytest.fixture
def tasks(tmp_path):
    words = ["disk partition editor", "web browser engine", "music player daemon", "mail transfer agent",
             "python library for images", "spell checker dictionary"]
    root = tmp_path / "tasks"
    _bitext_task(root / "debian_bitext_de", "de", [(w + " werkzeug", w) for w in words])
    _bitext_task(root / "debian_bitext_fr", "fr", [(w.split()[0] + " outil", w) for w in words])
    return root


def test_scores_resume_and_refuse_another_models_file(repo_root, tasks, tmp_path, capsys):
    ml = load_script(repo_root / "experiments" / "multilingual_eval.py")
    out = tmp_path / "bm25.json"
    assert ml.main(["--model", "bm25", "--tasks", str(tasks), "--out", str(out)]) == 0
    full = json.loads(out.read_text())
    assert full["complete"] is True and set(full["scores"]) == {"debian_bitext_de", "debian_bitext_fr"}
    assert full["scores"]["debian_bitext_de"]["accuracy"] == 1.0   # every query carries its English text

    # A run killed after its first task: the rerun keeps that task's score and computes the other.
    partial = dict(full, complete=False, scores={"debian_bitext_de": {"accuracy": 0.123, "ndcg_at_10": 0.5}})
    out.write_text(json.dumps(partial))
    assert ml.main(["--model", "bm25", "--tasks", str(tasks), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["complete"] is True
    assert again["scores"]["debian_bitext_de"]["accuracy"] == 0.123
    assert again["scores"]["debian_bitext_fr"] == full["scores"]["debian_bitext_fr"]
    assert "resuming: 1 of 2 task(s)" in capsys.readouterr().err

    before = out.read_text()
    with pytest.raises(SystemExit, match=r"holds the scores of --model 'bm25', not 'minilm'; pass another --out"):
        ml.main(["--model", "minilm", "--tasks", str(tasks), "--out", str(out)])
    assert out.read_text() == before


def test_compare_puts_models_side_by_side(repo_root, tmp_path, capsys):
    ml = load_script(repo_root / "experiments" / "multilingual_eval.py")
    a = {"model": "bm25", "complete": True, "scores": {
        "debian_bitext_de": {"accuracy": 0.5, "ndcg_at_10": 0.6}, "debian_bitext_ja": {"accuracy": 0.1, "ndcg_at_10": 0.2},
        "debian_xlret_ru": {"ndcg_at_10": 0.4}}}
    b = {"model": "x", "complete": False, "scores": {"debian_bitext_de": {"accuracy": 0.9, "ndcg_at_10": 1.0},
                                                     "debian_section_de": {"accuracy": 0.7}}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert ml.main(["--compare", f"BM25={tmp_path / 'a.json'}", f"mine={tmp_path / 'b.json'}"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| BM25") or line.startswith("| mine")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    # bitext R@1, bitext nDCG, cross-lingual, monolingual, section, mean nDCG (all), latin, cyrillic, cjk
    assert cells[0] == ["BM25", "0.300", "0.400", "0.400", "-", "-", "**0.400**", "0.600", "0.400", "0.200"]
    assert cells[1] == ["mine (partial: 2 tasks)", "0.900", "1.000", "-", "-", "0.700", "**1.000**", "1.000", "-", "-"]
    with pytest.raises(SystemExit):
        ml.main(["--compare", str(tmp_path / "a.json")])   # no label
