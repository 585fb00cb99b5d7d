"""TFDS array_record builders: JSONL, BEIR folder, shipped Debian pairs; validation at prepare time."""
import gzip
import json

import pytest

from embedder.data.builders import prepare_dataset
from embedder.data.records import BadRecordError


def _jsonl(path, records, gz=False):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _all(ds):
    return sorted((ds.source[i] for i in range(len(ds.source))), key=lambda r: r["query"])


def test_jsonl_builder_round_trip(tmp_path):
    recs = [{"query": f"q{i} 日本 😀", "positive": f"p{i}", "negatives": [f"n{i}"] * (i % 3),
             "task": "fact checking" if i == 0 else None, "title": "T" if i == 1 else None} for i in range(7)]
    a = _jsonl(tmp_path / "a.jsonl", recs[:4])
    b = _jsonl(tmp_path / "b.jsonl.gz", recs[4:], gz=True)
    ds = prepare_dataset({"name": "mine", "files": [str(a), str(b)]}, data_dir=tmp_path / "tfds")
    assert ds.name == "mine" and ds.skip_counts == {} and len(ds.source) == 7
    expected = [{"query": r["query"], "positive": r["positive"], "negatives": r["negatives"],
                 "task": r["task"] or "", "title": r["title"] or ""} for r in recs]
    assert _all(ds) == sorted(expected, key=lambda r: r["query"])
    assert "array_record" in " ".join(p.name for p in (tmp_path / "tfds").rglob("*"))
    # Prepared once: a second call reuses the files.
    again = prepare_dataset({"name": "mine", "files": [str(a), str(b)]}, data_dir=tmp_path / "tfds")
    assert again.directory == ds.directory


def test_validation_at_prepare_time_both_policies(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q1", "positive": "p1"}\n{"query": "q2"}\nnot json\n{"query": "q4", "positive": "p4"}\n')
    entry = {"name": "bad", "files": [str(path)]}
    with pytest.raises(BadRecordError, match=rf"^{path}:2: missing 'positive'"):
        prepare_dataset(entry, data_dir=tmp_path / "tfds", on_bad_record="strict")
    ds = prepare_dataset(entry, data_dir=tmp_path / "tfds", on_bad_record="skip")
    assert ds.skip_counts == {"missing_positive": 1, "invalid_json": 1}
    assert sorted(r["query"] for r in _all(ds)) == ["q1", "q4"]
    # Data prepared under "skip" still refuses to train under "strict", naming the first problem.
    with pytest.raises(BadRecordError, match=rf"^{path}:2: missing 'positive'"):
        prepare_dataset(entry, data_dir=tmp_path / "tfds", on_bad_record="strict")
    # A dataset left with no valid record stops even under "skip".
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(BadRecordError, match="no valid records"):
        prepare_dataset({"name": "e", "files": [str(empty)]}, data_dir=tmp_path / "tfds", on_bad_record="skip")
    # Changing a file re-prepares it.
    path.write_text('{"query": "fixed", "positive": "p"}\n')
    assert [r["query"] for r in _all(prepare_dataset(entry, data_dir=tmp_path / "tfds"))] == ["fixed"]


def test_beir_builder(tmp_path):
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    _jsonl(d / "corpus.jsonl", [{"_id": "d1", "title": "Title one", "text": "doc one"},
                                {"_id": "d2", "title": "", "text": "doc two"}])
    _jsonl(d / "queries.jsonl.gz", [{"_id": "q1", "text": "query one"}, {"_id": "q2", "text": "query two"}], gz=True)
    (d / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td2\t1\n")
    ds = prepare_dataset({"name": "beir", "builder": "beir", "path": str(d), "split": "dev"}, data_dir=tmp_path / "t")
    assert _all(ds) == [
        {"query": "query one", "positive": "doc one", "negatives": ["doc two"], "task": "", "title": "Title one"},
        {"query": "query two", "positive": "doc two", "negatives": [], "task": "", "title": ""}]
    with pytest.raises(BadRecordError, match=r"qrels/train.tsv: file not found"):
        prepare_dataset({"name": "beir", "builder": "beir", "path": str(d)}, data_dir=tmp_path / "t")


def test_builder_entry_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown builder 'csv'"):
        prepare_dataset({"name": "x", "builder": "csv"}, data_dir=tmp_path)
    with pytest.raises(ValueError, match="needs 'files'"):
        prepare_dataset({"name": "x", "builder": "jsonl"}, data_dir=tmp_path)
    with pytest.raises(ValueError, match="needs 'path'"):
        prepare_dataset({"name": "x", "builder": "beir"}, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="Debian pairs not found"):
        prepare_dataset({"name": "x", "builder": "debian", "path": str(tmp_path / "no.jsonl.gz")}, data_dir=tmp_path)


def test_debian_builder(tmp_path, debian_dir):
    # Default location is the shipped file; prepare a 300-pair slice of it to stay fast
    # (bench/data_pipeline.py prepares all 24,068).
    from embedder.data.builders import DEBIAN_PAIRS, make_builder

    assert DEBIAN_PAIRS == debian_dir / "train_pairs.jsonl.gz" and DEBIAN_PAIRS.exists()
    assert make_builder({"name": "debian", "builder": "debian"}, data_dir=tmp_path).builder_config.files == (
        str(DEBIAN_PAIRS),)
    with gzip.open(DEBIAN_PAIRS, "rt", encoding="utf-8") as f:
        lines = [f.readline() for _ in range(300)]
    part = tmp_path / "train_pairs.jsonl.gz"
    part.write_bytes(gzip.compress("".join(lines).encode()))
    ds = prepare_dataset({"name": "debian", "builder": "debian", "path": str(tmp_path)}, data_dir=tmp_path / "t")
    assert len(ds.source) == 300 and ds.skip_counts == {}
    expected = sorted((json.loads(l)["query"], json.loads(l)["positive"]) for l in lines)
    assert sorted((r["query"], r["positive"]) for r in _all(ds)) == expected
