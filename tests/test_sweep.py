"""Tests for embedder.sweep: run expansion, train commands, --print, local runs, soup over a sweep dir."""
import json
import shlex

import numpy as np
import pytest

from embedder import checkpoint, soup, sweep

SPEC = {"model": {"family": "bert", "hidden": 4}, "tokenizer": {"kind": "wordpiece", "file": "t.json"},
        "prompts": None}


def write_sweep(tmp_path, body):
    path = tmp_path / "s.py"
    path.write_text(f"def get_sweep():\n    return {body!r}\n")
    return path


def test_shipped_sweep_expands(repo_root, tmp_path):
    record = sweep.plan(repo_root / "experiments/sweeps/finetune_lr_seed.py", tmp_path / "sw")
    names = [r["name"] for r in record["runs"]]
    assert len(names) == 8 and len(set(names)) == 8
    first = record["runs"][0]
    assert first["overrides"] == {"loss.temperature": 0.05, "optimizer.learning_rate": 3e-4, "seed": 0}
    assert first["command"][:5] == ["python", "-m", "embedder.train", "--config=experiments/demo.py:finetune@workdir/demo",
                                    f"--workdir={tmp_path / 'sw' / first['name']}"]


def test_grid_commands_and_value_formats(tmp_path):
    path = write_sweep(tmp_path, {"config": "experiments/x.py:a", "fixed": {"total_steps": 4},
                                  "grid": {"optimizer.learning_rate": [0.001, 0.01], "loss.same_tower": [True],
                                           "loss.dims": [(64, 32)], "name_tag": ["a b"]}})
    record = sweep.plan(path, tmp_path / "d", extra=["--config.log_every=1"], python="py")
    assert [r["name"] for r in record["runs"]] == [
        "00-learning_rate=0.001_same_tower=true_dims=-64-32-_name_tag=a-b",
        "01-learning_rate=0.01_same_tower=true_dims=-64-32-_name_tag=a-b"]
    cmd = record["runs"][1]["command"]
    assert cmd == ["py", "-m", "embedder.train", "--config=experiments/x.py:a",
                   f"--workdir={tmp_path / 'd' / record['runs'][1]['name']}", "--config.total_steps=4",
                   "--config.optimizer.learning_rate=0.01", "--config.loss.same_tower=true",
                   "--config.loss.dims=(64, 32)", "--config.name_tag=a b", "--config.log_every=1"]


def test_print_writes_record_and_quoted_commands(tmp_path, capsys):
    path = write_sweep(tmp_path, {"config": "e.py", "grid": {"seed": [0, 1, 2]}})
    assert sweep.main([str(path), "--dir", str(tmp_path / "d"), "--print", "--config.total_steps=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert shlex.split(lines[2])[-2:] == ["--config.seed=2", "--config.total_steps=3"]
    record = json.loads((tmp_path / "d" / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["pending"] * 3


def test_local_run_records_status_and_resumes(tmp_path):
    path = write_sweep(tmp_path, {"config": "e.py", "grid": {"seed": [0, 1]}})
    record = sweep.plan(path, tmp_path / "d")
    calls = []
    sweep.run_sweep(record, tmp_path / "d", runner=lambda cmd: calls.append(cmd) or (1 if "--config.seed=1" in cmd else 0))
    assert [r["status"] for r in record["runs"]] == ["done", "failed"]
    saved = json.loads((tmp_path / "d" / "sweep.json").read_text())
    assert saved["runs"][1]["returncode"] == 1
    # A second invocation keeps finished runs and retries the failed one.
    again = sweep.merge_status(sweep.plan(path, tmp_path / "d"), saved)
    calls.clear()
    sweep.run_sweep(again, tmp_path / "d", runner=lambda cmd: calls.append(cmd) or 0)
    assert len(calls) == 1 and "--config.seed=1" in calls[0]
    assert [r["status"] for r in again["runs"]] == ["done", "done"]


def test_errors(tmp_path, capsys):
    with pytest.raises(sweep.SweepError, match="does not exist"):
        sweep.load_sweep(tmp_path / "none.py")
    with pytest.raises(sweep.SweepError, match="'grid' or 'runs'"):
        sweep.load_sweep(write_sweep(tmp_path, {"config": "e.py"}))
    with pytest.raises(sweep.SweepError, match="unknown sweep entries"):
        sweep.load_sweep(write_sweep(tmp_path, {"config": "e.py", "grid": {"a": [1]}, "gird": {}}))
    with pytest.raises(sweep.SweepError, match="non-empty list"):
        sweep.load_sweep(write_sweep(tmp_path, {"config": "e.py", "grid": {"a": 1}}))
    with pytest.raises(sweep.SweepError, match="named 'x'"):
        sweep.plan(write_sweep(tmp_path, {"config": "e.py", "runs": [{"name": "x"}, {"name": "x"}]}), tmp_path)
    good = write_sweep(tmp_path, {"config": "e.py", "grid": {"seed": [0]}})
    assert sweep.main([str(good), "--dir", str(tmp_path / "d"), "--index", "3"]) == 2
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main([str(good), "--dir", str(tmp_path / "d"), "--bogus"])


def test_sweep_dir_is_a_soup_input(tmp_path):
    path = write_sweep(tmp_path, {"config": "e.py", "grid": {"seed": [0, 1, 2]}})
    sweep_dir = tmp_path / "d"
    record = sweep.plan(path, sweep_dir)
    sweep.write_record(sweep_dir, record)
    rng = np.random.default_rng(0)
    ingredients = []
    for run in record["runs"][:2]:  # the third run never saved a model
        params = {"w": rng.standard_normal((4, 3)).astype(np.float32)}
        ingredients.append(params)
        checkpoint.save_params(sweep_dir / run["name"], params, SPEC)
    assert soup.expand_ingredients([sweep_dir]) == [sweep_dir / r["name"] for r in record["runs"][:2]]
    params, _, report = soup.make_soup([sweep_dir], shard=False)
    expected = (ingredients[0]["w"] + ingredients[1]["w"]) * np.float32(0.5)
    np.testing.assert_array_equal(np.asarray(params["w"]), expected)
    assert len(report["ingredients"]) == 2
    empty = tmp_path / "empty"
    sweep.write_record(empty, record)
    with pytest.raises(soup.SoupError, match="no run with a saved model"):
        soup.make_soup([empty])
