"""bench/qat_step.py runs end to end on the tiny config: the plain and a QAT train step, each in its
own process, with their times and memory reported (timings are never asserted)."""

import json
import math
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def test_qat_step_bench_tiny(tmp_path):
    out = tmp_path / "qat.json"
    proc = subprocess.run([sys.executable, str(BENCH / "qat_step.py"), "--model", "tiny", "--variants", "plain,mixed",
                           "--batch", "4", "--query-len", "8", "--doc-len", "16", "--reps", "1", "--block", "16",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["model"] == "tiny" and set(res["cpu"]) == {"model", "cores", "flags"}
    assert list(res["variants"]) == ["plain", "mixed"] and set(res["ratio_vs_plain"]) == {"mixed"}
    plain, mixed = res["variants"]["plain"], res["variants"]["mixed"]
    assert plain["quant_scheme"] == "" and mixed["quant_scheme"] == "mixed"
    for row in (plain, mixed):
        assert row["seconds"]["n"] == 1 and row["seconds"]["median"] > 0
        assert row["xla_temp_plus_argument_mib"] >= row["xla_argument_mib"] > 0 and row["peak_rss_mib"] > 0
        assert math.isfinite(row["loss"])
    assert mixed["loss"] != plain["loss"]   # the same batch and init, quantised
    assert "step time / plain: mixed" in proc.stdout
