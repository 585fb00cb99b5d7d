"""The Gemma side-by-side benchmarks run end to end on the tiny random Gemma 3 twin, and both sides
compute the same thing: after the same steps on the same weights the losses agree, and the
encodings agree with sentence-transformers' (timings are never asserted)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("sentence_transformers")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One converted tiny twin (ours and its sentence-transformers folder) for both benchmarks."""
    return tmp_path_factory.mktemp("bench_cache")


def _run(script: str, args: list[str], tmp_path: pathlib.Path, cache: pathlib.Path) -> dict:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, EMBEDDER_BENCH_CACHE=str(cache))
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_step_bench_gemma_tiny_same_loss_both_sides(tmp_path, bench_cache):
    res = _run("train_step.py", ["--model", "gemma3-tiny", "--batch", "6", "--lengths", "48",
                                 "--query-length", "16", "--dtypes", "float32", "--packing", "on",
                                 "--reps", "1"], tmp_path, bench_cache)
    cfg = res["configs"]["48/float32"]
    assert res["model"] == "gemma3-tiny" and set(res["cpu"]) == {"model", "cores", "flags"}
    assert cfg["query_length"] == 16 and cfg["real_tokens"] > 0
    losses = cfg["loss_after"]  # 1 warm-up + 1 timed step on each side, from the same weights
    assert losses["st"] == pytest.approx(losses["ours_packed"], rel=1e-4)
    assert cfg["padded_tokens"]["ours_packed"] <= cfg["padded_tokens"]["st"]
    assert cfg["seconds"]["st"]["n"] == 1 and "ratio_ours_packed_vs_st" in cfg


def test_encode_bench_gemma_tiny_matches_sentence_transformers(tmp_path, bench_cache):
    res = _run("encode.py", ["--model", "gemma3-tiny", "--texts", "24", "--lengths", "64", "--reps", "1",
                             "--batch", "8", "--variants", "ours_f32"], tmp_path, bench_cache)
    row = res["lengths"]["64"]
    assert res["model"] == "gemma3-tiny"
    assert row["max_abs_diff_vs_st"] < 1e-5
    assert row["real_tokens"] > 24
