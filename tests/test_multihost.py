"""Multi-host path on one machine: 2 processes x 4 CPU devices train exactly like 1 process x 8 devices."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "demo.py"
STEPS = 3

# The demo config made tiny: few steps, no evals, a checkpoint only at the end, the batch
# sharded over all 8 devices (data parallel), and the gradient cache on so the cross-device
# negatives and the chunked backward both take the multi-host path.
OVERRIDES = [
    f"--config.total_steps={STEPS}",
    "--config.log_every=1",
    "--config.batch_size=16",
    "--config.grad_cache_chunks=2",
    "--config.eval.tasks=()",
    "--config.eval.at_start=False",
    f"--config.checkpoint.every_steps={STEPS}",
    "--config.checkpoint.async_save=False",
    "--config.mesh.shape=(-1,1,1)",
    "--config.optimizer.warmup_steps=1",
]


def _launch(processes: int, devices: int, workdir: pathlib.Path, extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", str(processes),
           "--devices-per-process", str(devices), "--timeout", "400", "--",
           "--config", f"{DEMO}:prefinetune", "--workdir", str(workdir), *OVERRIDES, *extra]
    env = dict(os.environ)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=450, cwd=ROOT)


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.skipif(not DEMO.exists(), reason="experiments/demo.py is not there yet")
def test_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _launch(1, 8, one)
    assert r1.returncode == 0, r1.stdout[-4000:]
    r2 = _launch(2, 4, two)
    assert r2.returncode == 0, r2.stdout[-4000:]
    # Both processes ran and saw 8 devices between them.
    assert "[p0]" in r2.stdout and "[p1]" in r2.stdout

    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == list(range(1, STEPS + 1)), l1
    assert sorted(l2) == sorted(l1)
    for step in l1:
        assert abs(l1[step] - l2[step]) <= 1e-5, (step, l1[step], l2[step])

    from embedder.model_store import load_model

    p1, spec1 = load_model(str(one))
    p2, spec2 = load_model(str(two))
    assert spec1 == spec2
    flat1 = jax.tree_util.tree_leaves_with_path(p1)
    flat2 = jax.tree_util.tree_leaves_with_path(p2)
    assert [k for k, _ in flat1] == [k for k, _ in flat2]
    for (k, a), (_, b) in zip(flat1, flat2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(k))


@pytest.mark.skipif(not DEMO.exists(), reason="experiments/demo.py is not there yet")
def test_two_processes_distil_like_one_process(tmp_path):
    """Teacher signals joined per host slice: 2 processes' distilled losses equal 1 process's."""
    from embedder.data.builders import DEBIAN_PAIRS
    from embedder.distill.teacher import run_teacher
    from test_distill import HashTeacher

    run_teacher(HashTeacher(), [str(DEBIAN_PAIRS)], tmp_path / "signals", store="both", quiet=True)
    extra = [f"--config.data.teacher={tmp_path / 'signals'}", "--config.loss.distill_embedding_weight=1.0",
             "--config.loss.distill_score_weight=1.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _launch(1, 8, one, extra)
    assert r1.returncode == 0, r1.stdout[-4000:]
    r2 = _launch(2, 4, two, extra)
    assert r2.returncode == 0, r2.stdout[-4000:]
    rows = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert any("train/distill_embedding" in r for r in rows)
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    for step in l1:
        assert abs(l1[step] - l2[step]) <= 1e-5, (step, l1[step], l2[step])


@pytest.mark.skipif(not DEMO.exists(), reason="experiments/demo.py is not there yet")
def test_sigterm_to_one_host_stops_every_host_at_the_same_step(tmp_path):
    """A preemption notice reaching one host only: all hosts agree on one step (JAX's
    preemption service), save it together and exit 0, instead of one host entering a
    collective save the others never join."""
    import re
    import signal
    import time

    workdir = tmp_path / "run"
    overrides = [o for o in OVERRIDES if not o.startswith(("--config.total_steps", "--config.checkpoint.every"))]
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2",
           "--devices-per-process", "4", "--timeout", "400", "--",
           "--config", f"{DEMO}:prefinetune", "--workdir", str(workdir), *overrides,
           "--config.total_steps=1000", "--config.checkpoint.every_steps=1000"]
    env = dict(os.environ)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=ROOT)
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert launcher.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2, children
        # Popen order: the second child is process 1, a non-coordinator host.
        os.kill(int(sorted(children, key=int)[1]), signal.SIGTERM)
        out, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:  # a hang: the launcher stops its processes on SIGINT
            launcher.send_signal(signal.SIGINT)
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                launcher.kill()
    assert launcher.returncode == 0, out[-4000:]
    saved = {p: re.findall(rf"\[{p}\].*SIGTERM received: saved step (\d+)", out) for p in ("p0", "p1")}
    assert saved["p0"] and saved["p0"] == saved["p1"], (saved, out[-4000:])
    step = int(saved["p0"][0])
    assert 2 <= step < 1000
    assert (workdir / "checkpoints" / str(step)).is_dir(), sorted(p.name for p in (workdir / "checkpoints").iterdir())
