"""Hyper-parameter sweeps: run (or print) one `python -m embedder.train` per override set.

    python -m embedder.sweep experiments/sweeps/NAME.py --dir SWEEP_DIR [--print] [--index I]
                             [--config.x=v ...]

A sweep file defines `get_sweep() -> dict` with `config` (the base experiment,
`path.py[:ARG]`), and `grid` (`{key: [values]}`, crossed), `runs` (a list of
`{key: value}` override dicts, optionally with a `name`), or both (each run crossed
with the grid); `fixed` overrides apply to every run. Runs go to SWEEP_DIR/<run-name>,
and SWEEP_DIR/sweep.json records them, so SWEEP_DIR is itself a soup input.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Sequence

from embedder.cli_args import OneLineErrorParser

SWEEP_FILE = "sweep.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


class SweepError(ValueError):
    """A sweep file or sweep directory that cannot be used (the message says why)."""


def load_sweep(path) -> dict:
    """Imports a sweep file and returns its validated `get_sweep()` dict."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep(); it must return {{'config': ..., 'grid': ...}}")
    sweep = module.get_sweep()
    if not isinstance(sweep, dict) or not sweep.get("config"):
        raise SweepError(f"{path}: get_sweep() must return a dict with a 'config' entry (the base experiment)")
    unknown = sorted(set(sweep) - {"config", "grid", "runs", "fixed", "name"})
    if unknown:
        raise SweepError(f"{path}: unknown sweep entries {unknown}; allowed: config, grid, runs, fixed, name")
    if not sweep.get("grid") and not sweep.get("runs"):
        raise SweepError(f"{path}: get_sweep() needs a non-empty 'grid' or 'runs'")
    for key, values in (sweep.get("grid") or {}).items():
        if not isinstance(values, (list, tuple)) or not values:
            raise SweepError(f"{path}: grid entry {key!r} must be a non-empty list of values, got {values!r}")
    return sweep


def format_value(value) -> str:
    """A value as absl `config_flags` parses it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _describe(overrides: dict) -> str:
    return "_".join(f"{key.rsplit('.', 1)[-1]}={format_value(v)}" for key, v in overrides.items())


def _run_name(prefix: str, overrides: dict) -> str:
    described = _describe(overrides)
    return _UNSAFE.sub("-", f"{prefix}-{described}" if described else prefix)[:120]


def expand_runs(sweep: dict) -> list[dict]:
    """`[{"name", "overrides"}]`: each run's overrides (fixed, then run, then grid entries)."""
    grid = sweep.get("grid") or {}
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    base_runs = sweep.get("runs") or [{}]
    runs, names = [], set()
    for run in base_runs:
        run = dict(run)
        given_name = run.pop("name", None)
        for combo in combos:
            overrides = {**(sweep.get("fixed") or {}), **run, **combo}
            index = len(runs)
            name = _run_name(given_name, combo) if given_name else _run_name(f"{index:02d}", {**run, **combo})
            if name in names:
                raise SweepError(f"two runs are named {name!r}; give the runs distinct names")
            names.add(name)
            runs.append({"name": name, "overrides": overrides})
    return runs


def train_command(config: str, workdir, overrides: dict, extra: Sequence[str] = (), python: str = "python") -> list[str]:
    """The `python -m embedder.train` argv of one run."""
    cmd = [python, "-m", "embedder.train", f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]
    return cmd + list(extra)


def plan(sweep_path, sweep_dir, *, extra: Sequence[str] = (), python: str = "python") -> dict:
    """The sweep record (what sweep.json holds) for running `sweep_path` into `sweep_dir`."""
    sweep = load_sweep(sweep_path)
    sweep_dir = pathlib.Path(sweep_dir).absolute()
    runs = []
    for run in expand_runs(sweep):
        cmd = train_command(sweep["config"], sweep_dir / run["name"], run["overrides"], extra, python)
        runs.append({**run, "command": cmd, "status": "pending"})
    return {"name": sweep.get("name") or pathlib.Path(sweep_path).stem, "sweep_file": str(sweep_path),
            "config": sweep["config"], "extra": list(extra), "runs": runs,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def read_record(sweep_dir) -> dict:
    path = pathlib.Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise SweepError(f"{sweep_dir} is not a sweep directory: {SWEEP_FILE} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def write_record(sweep_dir, record: dict) -> None:
    sweep_dir = pathlib.Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / (SWEEP_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(sweep_dir / SWEEP_FILE)


def merge_status(new: dict, old: dict | None) -> dict:
    """Keeps the status of runs that an earlier invocation already finished (same name and command)."""
    if not old:
        return new
    previous = {r["name"]: r for r in old.get("runs", [])}
    for run in new["runs"]:
        done = previous.get(run["name"])
        if done and done.get("command") == run["command"]:
            run.update({k: v for k, v in done.items() if k in ("status", "returncode", "seconds")})
    new["created"] = old.get("created", new["created"])
    return new


def run_sweep(record: dict, sweep_dir, *, indices: Sequence[int] | None = None, runner=subprocess.call) -> dict:
    """Runs the pending runs one after another (a finished run is skipped, a failed one retried)."""
    chosen = range(len(record["runs"])) if indices is None else indices
    for i in chosen:
        run = record["runs"][i]
        if run.get("status") == "done":
            print(f"[{i + 1}/{len(record['runs'])}] {run['name']}: done already, skipped")
            continue
        print(f"[{i + 1}/{len(record['runs'])}] {run['name']}: {shlex.join(run['command'])}", flush=True)
        run["status"] = "running"
        write_record(sweep_dir, record)
        start = time.time()
        rc = runner(run["command"])
        run.update(status="done" if rc == 0 else "failed", returncode=rc, seconds=round(time.time() - start, 1))
        write_record(sweep_dir, record)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m embedder.sweep", description=__doc__.split("\n")[0],
                           epilog="Further --config.x=v flags are passed to every run.")
    p.add_argument("sweep_file", help="experiments/sweeps/NAME.py defining get_sweep()")
    p.add_argument("--dir", required=True, help="sweep directory; each run trains in DIR/<run-name>")
    p.add_argument("--print", action="store_true", dest="print_only",
                   help="print one command per run (for a cluster) and write sweep.json, run nothing")
    p.add_argument("--index", type=int, action="append",
                   help="run only run number I (0-based; repeatable), e.g. from a job array")
    p.add_argument("--python", default=None, help="interpreter in the commands (default: this one; "
                                                 "'python' with --print)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (only --config.x=v flags pass through)")
    python = args.python or ("python" if args.print_only else sys.executable)
    try:
        record = plan(args.sweep_file, args.dir, extra=extra, python=python)
        old = read_record(args.dir) if (pathlib.Path(args.dir) / SWEEP_FILE).is_file() else None
        record = merge_status(record, old)
        for i in args.index or []:
            if not 0 <= i < len(record["runs"]):
                raise SweepError(f"--index {i} is out of range: the sweep has {len(record['runs'])} runs")
    except SweepError as e:
        print(f"python -m embedder.sweep: error: {e}", file=sys.stderr)
        return 2
    write_record(args.dir, record)
    if args.print_only:
        for run in record["runs"]:
            print(shlex.join(run["command"]))
        return 0
    record = run_sweep(record, args.dir, indices=args.index)
    failed = [r["name"] for r in record["runs"] if r.get("status") == "failed"]
    if failed:
        print(f"failed runs: {', '.join(failed)} (see {pathlib.Path(args.dir) / SWEEP_FILE})", file=sys.stderr)
        return 1
    print(f"sweep finished: {pathlib.Path(args.dir) / SWEEP_FILE}; soup it with "
          f"python -m embedder.soup --out OUT {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
