"""bench/dots.py runs end to end on a tiny config, and every contestant computes the same product:
f32 sides to f32 rounding of a float64 reference, bf16 sides to bf16's (timings are never asserted)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def test_dots_bench_tiny_shapes_and_errors(tmp_path):
    out = tmp_path / "dots.json"
    proc = subprocess.run([sys.executable, str(BENCH / "dots.py"), "--model", "tiny", "--rows", "64",
                           "--reps", "1", "--out", str(out)], env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    # tiny: hidden 64, 4 heads x 16, 2 kv heads, mlp 128
    assert {n: (d["k"], d["n"], d["per_layer"]) for n, d in res["dots"].items()} == {
        "q": (64, 64, 1), "k": (64, 32, 1), "v": (64, 32, 1), "o": (64, 64, 1),
        "gate_up": (64, 128, 2), "down": (128, 64, 1)}
    for name, d in res["dots"].items():
        err = d["max_rel_error_vs_f64"]
        assert max(err["torch_f32"], err["ours_f32"], err["ours_f32_ynn"]) < 1e-5, (name, err)
        assert 1e-5 < err["ours_bf16"] < 2e-2 and 1e-5 < err["torch_bf16"] < 2e-2, (name, err)
        assert set(d["ms"]) == {"torch_f32", "ours_f32", "ours_f32_ynn", "torch_bf16", "ours_bf16",
                                "ours_bf16_f32_out"}
    assert set(res["forward_ratio"]) == {"f32", "bf16"} and res["rows"] == 64
    assert set(res["cpu"]) == {"model", "cores", "flags"}


def test_dots_bench_refuses_unknown_model():
    proc = subprocess.run([sys.executable, str(BENCH / "dots.py"), "--model", "no-such-model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
