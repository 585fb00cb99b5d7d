"""The shared JSONL reader: plain and gzip, blank lines, line numbers, bad-line handling."""

import gzip

import pytest

from embedder.data.jsonl import JsonlError, iter_jsonl, open_text


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_reads_plain_and_gzip_with_line_numbers(tmp_path, name):
    path = tmp_path / name
    with open_text(path, "w") as f:
        f.write('{"a": 1}\n\n  \n{"a": "é"}\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": "é"})]
    if name.endswith(".gz"):
        assert gzip.open(path).read().startswith(b'{"a": 1}')


def test_bad_lines_raise_or_go_to_the_handler(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ok": true}\n{"broken": \n[1, 2]\n{"ok": false}\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_jsonl(path))
    seen = []
    rows = list(iter_jsonl(path, on_error=seen.append))
    assert rows == [(1, {"ok": True}), (4, {"ok": False})]
    assert seen[0].endswith("bad.jsonl:2: not valid JSON (Expecting value at column 12)")   # just past the end of the line
    assert seen[1].endswith("bad.jsonl:3: expected a JSON object, got list")


def test_the_column_of_a_json_error_counts_characters(tmp_path):
    """Column 1 is the first character; multi-byte characters before the fault count once."""
    path = tmp_path / "col.jsonl"
    path.write_text('{"q": "日本語", x}\n', encoding="utf-8")
    with pytest.raises(JsonlError) as e:
        list(iter_jsonl(path))
    assert str(e.value).endswith("col.jsonl:1: not valid JSON (Expecting property name enclosed in double quotes "
                                 "at column 14)")
    assert '{"q": "日本語", x}'.index("x") + 1 == 14
