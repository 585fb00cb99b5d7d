"""The selection/report split of retrieval queries and `python -m embedder.evaluate --queries`."""
import dataclasses
import hashlib
import json

import pytest
from test_evaluate_fakes import HashingEncoder, make_tasks

from embedder.evaluate import evaluate_task, load_task
from embedder.evaluate.query_split import QuerySplitError, query_half, split_task


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    return make_tasks(tmp_path_factory.mktemp("tasks"))


def test_halves_partition_the_queries_whatever_their_order(task_dirs):
    task = load_task(task_dirs["retrieval"])
    ids = task.data["query_ids"]
    select = split_task(task, "select").data["query_ids"]
    report = split_task(task, "report").data["query_ids"]
    assert select and report and not set(select) & set(report)
    assert sorted(select + report) == sorted(ids)
    # The documented rule, so a seed recorded in soup.json means the same split in later versions.
    for seed in (0, 3):
        for qid in ids:
            digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
            assert query_half(qid, seed) == ("select", "report")[digest[-1] % 2]
    # Reversed queries.jsonl: the same halves; another seed: another split.
    data = task.data
    order = list(reversed(range(len(ids))))
    shuffled = dataclasses.replace(task, data=dict(data, query_ids=[ids[i] for i in order],
                                                   query_texts=[data["query_texts"][i] for i in order]))
    assert sorted(split_task(shuffled, "report").data["query_ids"]) == sorted(report)
    assert [query_half(q, 1) for q in ids] != [query_half(q, 0) for q in ids]
    # Texts follow their ids; corpus and judgements stay whole.
    half = split_task(task, "report")
    texts = dict(zip(ids, data["query_texts"]))
    assert half.data["query_texts"] == [texts[q] for q in report]
    assert half.data["corpus_ids"] == data["corpus_ids"] and half.data["qrels"] == data["qrels"]


def test_shipped_debian_retrieval_splits_in_two_halves(repo_root):
    # The README's soup table uses this split (seed 0).
    task = load_task(repo_root / "data" / "debian" / "tasks" / "debian_retrieval")
    sizes = [len(split_task(task, half).data["query_ids"]) for half in ("select", "report")]
    assert sizes == [496, 504]


def test_split_errors(task_dirs, tmp_path):
    with pytest.raises(QuerySplitError, match=r"classification task: only retrieval .* --select-task"):
        split_task(load_task(task_dirs["classification"]), "select")
    task = load_task(task_dirs["retrieval"])
    with pytest.raises(QuerySplitError, match="half 'train' is unknown"):
        split_task(task, "train")
    lonely = dataclasses.replace(task, data=dict(task.data, query_ids=["q0"], query_texts=["x"]))
    empty = "report" if query_half("q0") == "select" else "select"
    with pytest.raises(QuerySplitError, match=f"none of its 1 queries falls in the {empty} half"):
        split_task(lonely, empty)


class RecordingEncoder(HashingEncoder):
    def __init__(self):
        super().__init__(dim=32)
        self.queries = []

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None):
        if role == "query" and task == "p-retrieval":
            self.queries += list(texts)
        return super().encode(texts, role, task, dim, batch_size, titles)


def test_evaluate_cli_scores_only_the_chosen_half(task_dirs, tmp_path, monkeypatch, capsys):
    import embedder
    from embedder.evaluate.__main__ import main

    encoder = RecordingEncoder()
    monkeypatch.setattr(embedder.Embedder, "load", classmethod(lambda cls, path, **kw: encoder))
    task = load_task(task_dirs["retrieval"])
    out = tmp_path / "eval.json"
    assert main(["--model", "m", "--task", str(task_dirs["retrieval"]), "--task", str(task_dirs["clustering"]),
                 "--queries", "report", "--split-seed", "0", "--out", str(out)]) == 0
    report = split_task(task, "report")
    assert sorted(encoder.queries) == sorted(report.data["query_texts"])
    written = json.loads(out.read_text())
    assert written["queries"] == "report" and written["split_seed"] == 0
    result = written["results"]["Toyretrieval"]
    assert result["query_split"] == {"task": "Toyretrieval", "path": str(task_dirs["retrieval"]), "half": "report",
                                     "split_seed": 0, "queries": len(report.data["query_ids"]), "of": 12}
    expected = evaluate_task(HashingEncoder(dim=32), report)["dims"]["32"]
    assert result["dims"]["32"] == pytest.approx(expected)
    # Clustering has no queries to split: scored whole.
    assert written["results"]["Toyclustering"]["size"] == {"test": 40}
    assert f"the report half of the queries ({len(report.data['query_ids'])} of 12, split seed 0)" \
        in capsys.readouterr().out

    assert main(["--model", "m", "--task", str(task_dirs["clustering"]), "--queries", "select"]) == 2
    assert "none of the tasks given is a retrieval task" in capsys.readouterr().err
