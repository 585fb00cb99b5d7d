"""A run's workdir files that must survive restarts: `metrics.jsonl` and TensorBoard
(trimmed to the resume step) and `config.json` (written atomically, changes warned about)."""

from __future__ import annotations

import json
import logging
import os
import pathlib

log = logging.getLogger("embedder.train")


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard (process 0 only).

    `resume_step`: the step a resumed run starts from. Rows logged after it by the
    interrupted run (and a line cut short by a kill) are dropped from `metrics.jsonl`,
    and TensorBoard is told to purge its events after it, so a resumed run's steps
    appear once. At 0 (a run that restarts from scratch) every earlier row goes,
    including a step-0 evaluation, which the new run repeats.
    """

    def __init__(self, workdir: pathlib.Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._tb = None
        if enabled:
            path = workdir / "metrics.jsonl"
            if path.exists():
                truncate_metrics(path, resume_step if resume_step > 0 else -1)
            self._file = open(path, "a", encoding="utf-8")
            try:
                from tensorboardX import SummaryWriter

                # Events at steps >= purge_step from earlier event files are hidden.
                purge = resume_step + 1 if resume_step > 0 else 0
                # Event files are named by the second they were opened (and opened with "wb"):
                # the suffix keeps a quick restart from overwriting the interrupted run's file.
                self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge,
                                         filename_suffix=f".{os.getpid()}.{resume_step}")
            except ImportError:  # TensorBoard is optional
                self._tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """Keeps the rows of `path` at steps <= `last_step`; drops unparsable (cut) lines."""
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        log.info("metrics.jsonl: dropped %d row(s) logged after step %d by an interrupted run",
                 dropped, max(last_step, 0))
        write_atomic(path, "".join(line + "\n" for line in kept))


def write_atomic(path: pathlib.Path, text: str) -> None:
    """A kill mid-write leaves the old file, never a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _flat_diff(old, new, prefix="") -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _flat_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def write_config_json(workdir: pathlib.Path, cfg: dict) -> None:
    path = workdir / "config.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = None
        changed = _flat_diff(previous, cfg) if isinstance(previous, dict) else []
        if changed:
            # Each checkpoint step keeps the config it was saved with (item `config`).
            log.warning("config.json: this run's config differs from the workdir's previous one in %s; "
                        "overwriting (a resumed run then differs from an uninterrupted one)",
                        ", ".join(changed[:20]) + (" ..." if len(changed) > 20 else ""))
    write_atomic(path, json.dumps(cfg, indent=1, sort_keys=True))
