"""The train loop's host-side pieces, in process and without compiling: config checks,
metrics truncation on resume, TensorBoard purge, config.json rewrite, the flag parser."""
import json
import logging
import struct
import subprocess
import sys

import numpy as np
import pytest

from embedder.train import loop, workdir_files
from embedder.train.config import base_config


def _config(**changes):
    c = base_config()
    c.total_steps = 20
    c.optimizer.warmup_steps = 5
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_check_config_accepts_defaults_and_edges():
    loop.check_config(_config())
    loop.check_config(_config(optimizer__warmup_steps=20))   # warmup == total_steps is allowed
    loop.check_config(_config(optimizer__warmup_steps=0, eval__every_steps=0))


@pytest.mark.parametrize("changes, expected", [
    ({"optimizer__warmup_steps": 21}, "config.optimizer.warmup_steps=21 is outside [0, total_steps=20]; "
                                      "set --config.optimizer.warmup_steps=20"),
    ({"optimizer__warmup_steps": -1}, "set --config.optimizer.warmup_steps=0"),
    ({"total_steps": 0, "optimizer__warmup_steps": 0}, "config.total_steps=0 must be >= 1"),
    ({"log_every": 0}, "config.log_every=0 must be >= 1"),
    ({"checkpoint__every_steps": 0}, "config.checkpoint.every_steps=0 must be >= 1"),
    ({"eval__every_steps": -5}, "config.eval.every_steps=-5 must be >= 0"),
    ({"batch_size": 0}, "config.batch_size=0 must be >= 1"),
])
def test_check_config_rejects_with_the_fix(changes, expected):
    with pytest.raises(loop.ConfigError) as e:
        loop.check_config(_config(**changes))
    assert expected in str(e.value)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_writer_drops_rows_after_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": float(s)}) for s in (1, 2, 3, 4, 5, 6)]
    lines.insert(3, json.dumps({"step": 3, "eval/x": 0.5}))   # an eval row at a kept step
    # The interrupted run was killed while writing a row: a cut line at the end.
    path.write_text("\n".join(lines) + "\n" + '{"step": 7, "train/lo')
    writer = workdir_files.MetricsWriter(tmp_path, resume_step=4)
    writer.write(5, {"train/loss": 50.0})
    writer.close()
    rows = _rows(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5]
    assert rows[-1]["train/loss"] == 50.0 and rows[3] == {"step": 3, "eval/x": 0.5}


def test_metrics_writer_restart_from_scratch_drops_all_and_disabled_writes_nothing(tmp_path):
    # A run killed before its first checkpoint restarts at step 0: its step-0 eval reruns too.
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/x": 1.0}\n{"step": 1, "a": 5.0}\n')
    writer = workdir_files.MetricsWriter(tmp_path, resume_step=0)
    writer.write(1, {"a": 1})
    writer.close()
    assert _rows(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 1.0}]
    other = tmp_path / "other"
    other.mkdir()
    silent = workdir_files.MetricsWriter(other, enabled=False, resume_step=3)
    silent.write(4, {"a": 1})
    silent.close()
    assert list(other.iterdir()) == []


def _tfrecords(path):
    """Records of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
    data, pos = path.read_bytes(), 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        yield data[pos + 12:pos + 12 + n]
        pos += 12 + n + 4


def _visible_scalars(logdir, tag):
    """Scalars as TensorBoard shows them: a SessionLog.START at step T hides earlier events >= T."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    files = []
    for f in logdir.glob("events.out.tfevents.*"):
        events = [Event.FromString(r) for r in _tfrecords(f)]
        files.append((events[0].wall_time, events))
    seen = []
    for _, events in sorted(files, key=lambda fe: fe[0]):
        for e in events:
            if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                seen = [(s, v) for s, v in seen if s < e.step]
            for v in e.summary.value:
                if v.tag == tag:
                    seen.append((e.step, v.simple_value))
    return seen


def test_tensorboard_purges_events_after_resume_step(tmp_path):
    pytest.importorskip("tensorboardX")
    first = workdir_files.MetricsWriter(tmp_path)
    for s in range(1, 7):
        first.write(s, {"train/loss": float(s)})
    first.close()
    resumed = workdir_files.MetricsWriter(tmp_path, resume_step=4)
    for s in (5, 6):
        resumed.write(s, {"train/loss": 10.0 * s})
    resumed.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert _visible_scalars(tmp_path / "tensorboard", "train/loss") == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]


def test_config_json_rewrite_warns_about_changed_fields(tmp_path, caplog):
    workdir_files.write_config_json(tmp_path, {"a": 1, "b": {"c": 2, "d": [1, 2]}})
    with caplog.at_level(logging.WARNING, logger="embedder.train"):
        workdir_files.write_config_json(tmp_path, {"a": 1, "b": {"c": 2, "d": [1, 2]}})
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="embedder.train"):
        workdir_files.write_config_json(tmp_path, {"a": 1, "b": {"c": 3, "d": [1, 2]}, "e": 0})
    assert "b.c, e" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1, "b": {"c": 3, "d": [1, 2]}, "e": 0}
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_config_field_is_one_line_with_suggestion(tmp_path, repo_root):
    cfg = tmp_path / "exp.py"
    cfg.write_text("from embedder.train.config import base_config\n\n"
                   "def get_config(arg=None):\n    return base_config()\n")
    p = subprocess.run([sys.executable, "-m", "embedder.train", "--config", str(cfg), "--workdir",
                        str(tmp_path / "w"), "--config.optimizer.learning_rat=1"],
                       cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert ("--config.optimizer.learning_rat: the config has no field 'learning_rat'" in p.stderr
            and "Did you mean --config.optimizer.learning_rate" in p.stderr), p.stderr


def test_window_losses_average_the_window_and_each_dataset():
    fetched = [{"loss": np.float32(v)} for v in (1.0, 3.0, 8.0, 4.0)]
    row = loop._window_losses(fetched, [0, 1, None, 1], ["retrieval", "sections"])
    assert row == {"train/loss_mean": 4.0, "train/loss_mean/retrieval": 1.0, "train/loss_mean/sections": 3.5}
    # One dataset: no per-dataset keys (they would repeat the mean).
    assert loop._window_losses(fetched[:2], [0, 0], ["only"]) == {"train/loss_mean": 2.0}
