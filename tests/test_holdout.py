"""embedder.evaluate.holdout: a validation retrieval task carved out of training pairs by group -
disjoint from the training side by group and by text, one document per group, stable under
reordering, loadable as a BEIR task, and clear errors."""
import json
import random

import pytest

from embedder.evaluate.holdout import HoldoutError, holdout_retrieval, main, package_family, write_task
from embedder.evaluate.tasks import load_task


def _records(n=120, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = "tool" + "".join(chr(97 + int(d)) for d in str(i // 3))   # no digits: they end a version
        variant = ["", "-dev", "-doc"][i % 3]
        pkg = ("lib" if variant == "-dev" else "") + name + ("1" if variant == "-dev" else "") + variant
        out.append({"query": f"synopsis {i} {rng.random():.6f}", "positive": f"description of {name} number {i}",
                    "package": pkg})
    # A training row that copies a text of another family: must leave training if that one is held out.
    out.append({"query": "copied", "positive": out[0]["positive"], "package": "unrelated"})
    return out


def test_package_family_merges_binary_variants():
    assert {package_family(p) for p in ("libfoo2-dev", "foo-doc", "python3-foo", "foo", "libfoo2", "foo-data",
                                        "libfoo2t64")} == {"foo"}
    assert package_family("bar") != package_family("baz")


def test_groups_and_texts_are_disjoint_from_training():
    records = _records()
    h = holdout_retrieval(records, group=lambda r: package_family(r["package"]), num_queries=6, corpus_size=12)
    held = {d["group"] for d in h.corpus}
    assert len(h.corpus) == 12 and len(held) == 12 and len(h.queries) == 6
    # Independent check: families recomputed from the records, texts compared directly.
    for r in h.train:
        assert package_family(r["package"]) not in held
    held_texts = {r[f] for r in records if package_family(r["package"]) in held for f in ("query", "positive")}
    assert not {r[f] for r in h.train for f in ("query", "positive")} & held_texts
    # Every record is on exactly one side, or dropped for sharing a text.
    n_held = sum(package_family(r["package"]) in held for r in records)
    assert len(h.train) + n_held + h.stats["train_dropped_for_shared_text"] == len(records)
    # Each query's judged document is its own group's description.
    docs = {d["_id"]: d for d in h.corpus}
    by_text = {r["query"]: r for r in records}
    for q in h.queries:
        assert docs[h.qrels[q["_id"]]]["text"] == by_text[q["text"]]["positive"]
        assert docs[h.qrels[q["_id"]]]["group"] == q["group"]


def test_split_ignores_record_order_and_depends_on_seed():
    records = _records()
    a = holdout_retrieval(records, group=lambda r: package_family(r["package"]), num_queries=5, corpus_size=10)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    b = holdout_retrieval(shuffled, group=lambda r: package_family(r["package"]), num_queries=5, corpus_size=10)
    assert {d["text"] for d in a.corpus} == {d["text"] for d in b.corpus}
    c = holdout_retrieval(records, group=lambda r: package_family(r["package"]), num_queries=5, corpus_size=10,
                          seed=1)
    assert {d["group"] for d in c.corpus} != {d["group"] for d in a.corpus}


def test_written_task_loads_and_errors_are_clear(tmp_path, capsys):
    records = _records()
    h = holdout_retrieval(records, group=lambda r: r["package"], num_queries=4, corpus_size=8)
    task = load_task(write_task(h, tmp_path / "val", name="Val"))
    assert task.type == "retrieval" and task.name == "Val" and len(task.data["query_ids"]) == 4
    assert len(task.data["corpus_ids"]) == 8
    with pytest.raises(HoldoutError, match="in 41 groups give only 40 distinct documents"):
        holdout_retrieval(records, group=lambda r: package_family(r["package"]), num_queries=4, corpus_size=500)
    with pytest.raises(HoldoutError, match="record 2 has no text in field 'positive'"):
        holdout_retrieval([records[0], {"query": "q"}], group=lambda r: "g", num_queries=1, corpus_size=1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main([str(pairs), str(tmp_path / "cli"), "--queries", "3", "--corpus", "9", "--debian-families",
                 "--train-out", str(tmp_path / "train.jsonl")]) == 0
    assert len(load_task(tmp_path / "cli").data["query_ids"]) == 3
    assert main([str(pairs), str(tmp_path / "bad"), "--queries", "3", "--corpus", "900", "--debian-families"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
