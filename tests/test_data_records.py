"""Bad-record policy: every kind of bad input, under `strict` (one-line error) and `skip` (counted)."""
import gzip
import json
import re

import pytest

from embedder.data.records import BadRecordError, BadRecordLog, read_beir_pairs, read_jsonl_pairs

GOOD = {"query": "q", "positive": "p"}


def _write(path, lines: list[bytes], gz=False):
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# (reason, bad line bytes) - each file is: good line, BAD line, good line; the bad one is line 2.
LINE_CASES = [
    ("invalid_json", b'{"query": "q", "positive": '),
    ("wrong_type", b'["not", "an", "object"]'),
    ("missing_query", _j({"positive": "p"})),
    ("missing_positive", _j({"query": "q"})),
    ("empty_query", _j({"query": "   ", "positive": "p"})),
    ("empty_positive", _j({"query": "q", "positive": ""})),
    ("wrong_type", _j({"query": 7, "positive": "p"})),
    ("wrong_type", _j({"query": "q", "positive": "p", "negatives": "n"})),
    ("wrong_type", _j({"query": "q", "positive": "p", "negatives": ["n", 3]})),
    ("wrong_type", _j({"query": "q", "positive": "p", "title": 5})),
    ("missing_query", _j({"query": None, "positive": "p"})),
    ("not_utf8", b'{"query": "caf\xe9", "positive": "p"}'),
    ("text_too_long", _j({"query": "q", "positive": "x" * 101})),
    ("text_too_long", _j({"query": "q", "positive": "p", "negatives": ["y" * 101]})),
]
ONE_LINE = re.compile(r"^(?P<file>[^\n]+):(?P<line>\d+): [^\n]+ \([^\n]+\)$")


@pytest.mark.parametrize("reason,bad", LINE_CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(LINE_CASES)])
@pytest.mark.parametrize("gz", [False, True])
def test_bad_line_strict_and_skip(tmp_path, reason, bad, gz):
    path = _write(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"),
                  [_j({**GOOD, "query": "first"}), bad, _j({**GOOD, "query": "third"})], gz=gz)
    with pytest.raises(BadRecordError) as e:
        list(read_jsonl_pairs([path], BadRecordLog("strict"), max_text_chars=100))
    m = ONE_LINE.match(str(e.value))
    assert m, str(e.value)
    assert m["file"] == str(path) and m["line"] == "2" and e.value.reason == reason
    log = BadRecordLog("skip")
    records = list(read_jsonl_pairs([path], log, max_text_chars=100))
    assert [r["query"] for _, r in records] == ["first", "third"]
    assert [k for k, _ in records] == ["0:1", "0:3"]
    assert dict(log.counts) == {reason: 1}
    assert log.examples[reason] == str(e.value)
    assert reason in log.summary()


def test_bad_bytes_and_bad_json_are_named_by_character_column(tmp_path):
    """Columns count characters from 1 (not bytes): `é` before the fault counts once."""
    line = '{"query": "é", "positive": "caf'.encode() + b"\xe9" + b'"}'
    path = _write(tmp_path / "u.jsonl", [line])
    with pytest.raises(BadRecordError, match=r"bytes are not UTF-8 at column 32 "):
        list(read_jsonl_pairs([path], BadRecordLog("strict"), max_text_chars=100))
    assert len('{"query": "é", "positive": "caf') + 1 == 32
    path = _write(tmp_path / "j.jsonl", ['{"query": "é", "positive" "p"}'.encode()])
    with pytest.raises(BadRecordError, match=r"invalid JSON: Expecting ':' delimiter at column 27 "):
        list(read_jsonl_pairs([path], BadRecordLog("strict"), max_text_chars=100))


@pytest.mark.parametrize("case", ["missing", "empty", "blank_lines_only", "corrupt_gz", "directory"])
def test_bad_files(tmp_path, case):
    path, reason = {
        "missing": (tmp_path / "nope.jsonl", "missing_file"),
        "empty": (_write(tmp_path / "e.jsonl", []), "empty_file"),
        "blank_lines_only": (_write(tmp_path / "b.jsonl", [b"", b"   "]), "empty_file"),
        "corrupt_gz": (tmp_path / "c.jsonl.gz", "unreadable_file"),
        "directory": (tmp_path, "missing_file"),
    }[case]
    if case == "corrupt_gz":
        path.write_bytes(b"this is not gzip data")
    good = _write(tmp_path / "good.jsonl", [_j(GOOD)])
    with pytest.raises(BadRecordError) as e:
        list(read_jsonl_pairs([path, good], BadRecordLog("strict"), max_text_chars=100))
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value) and "(" in str(e.value)
    assert e.value.reason == reason
    log = BadRecordLog("skip")
    assert [r["query"] for _, r in read_jsonl_pairs([path, good], log, 100)] == ["q"]
    assert dict(log.counts) == {reason: 1}


def test_good_record_normalised(tmp_path):
    path = _write(tmp_path / "g.jsonl", [b"", _j({"query": "日本 😀", "positive": "p\tq", "negatives": ["a", " ", "b"],
                                               "task": "fact checking", "title": None, "extra": 1})])
    [(key, rec)] = list(read_jsonl_pairs(path, BadRecordLog("strict"), 100))
    assert key == "0:2"   # file index, line: the same wherever the file lives (TFDS orders by key)
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    assert [k for k, _ in read_jsonl_pairs([moved, path], BadRecordLog("strict"), 100)] == ["0:2", "1:2"]
    assert rec == {"query": "日本 😀", "positive": "p\tq", "negatives": ["a", "b"], "task": "fact checking",
                   "title": ""}


def test_policy_name_checked():
    with pytest.raises(ValueError, match="use 'strict' or 'skip'"):
        BadRecordLog("ignore")


def _beir(tmp_path, qrels_lines):
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    _write(d / "corpus.jsonl.gz", [_j({"_id": "d1", "title": "T1", "text": "doc one"}),
                                  _j({"_id": "d2", "title": "", "text": "doc two"}),
                                  _j({"_id": "d3", "text": "doc three"})], gz=True)
    _write(d / "queries.jsonl", [_j({"_id": "q1", "text": "query one"}), _j({"_id": 2, "text": "query two"})])
    (d / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(l + "\n" for l in qrels_lines))
    return d


def test_beir_pairs_and_bad_qrels(tmp_path):
    d = _beir(tmp_path, ["q1\td1\t1", "q1\td3\t0", "2\td2\t2", "2\td3\t1", "q9\td1\t1", "q1\td1\tx"])
    with pytest.raises(BadRecordError, match=r"qrels/train.tsv:6: query id 'q9' is not in queries.jsonl"):
        list(read_beir_pairs(d, "train", BadRecordLog("strict"), 1000))
    log = BadRecordLog("skip")
    recs = {k: r for k, r in read_beir_pairs(d, "train", log, 1000)}
    assert dict(log.counts) == {"unknown_id": 1, "invalid_qrel": 1}
    q = str(d / "qrels" / "train.tsv")
    assert recs == {
        f"{q}:2": {"query": "query one", "positive": "doc one", "negatives": ["doc three"], "task": "", "title": "T1"},
        f"{q}:4": {"query": "query two", "positive": "doc two", "negatives": [], "task": "", "title": ""},
        f"{q}:5": {"query": "query two", "positive": "doc three", "negatives": [], "task": "", "title": ""},
    }
