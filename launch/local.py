"""Runs N local processes as one multi-host JAX job (CPU), to exercise the multi-host path on one machine.

    python launch/local.py --processes 2 --devices-per-process 4 -- \\
        --config experiments/demo.py:prefinetune --workdir /tmp/run

starts `python -m embedder.train --distributed <args>` N times with a coordinator
on 127.0.0.1 (a free port), JAX_NUM_PROCESSES / JAX_PROCESS_ID per process,
JAX_PLATFORMS=cpu and M fake devices each. Output lines are prefixed `[pI]`.
The exit status is non-zero if any process fails; the others are then stopped.
`--command` runs the words after `--` as the whole command instead.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the coordinator binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int, port: int,
                devices_per_process: int) -> dict[str, str]:
    """The environment of local process `process_id`: coordinator, ids, CPU platform, fake devices."""
    env = dict(base)
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    env["JAX_NUM_PROCESSES"] = str(num_processes)
    env["JAX_PROCESS_ID"] = str(process_id)
    env["JAX_PLATFORMS"] = "cpu"
    # Our device count replaces any inherited one (pytest's conftest sets 8).
    other_flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(other_flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["PYTHONUNBUFFERED"] = "1"
    # `python -m embedder...` must work from any directory, installed or not.
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def process_command(args: argparse.Namespace) -> list[str]:
    words = list(args.args)
    if args.command:
        if not words:
            raise SystemExit("launch/local.py: --command needs the command after `--`, e.g. -- python x.py")
        return words
    if args.module == "embedder.train" and "--distributed" not in words:
        words = ["--distributed"] + words
    return [args.python, "-m", args.module] + words


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            out.write(f"{prefix} {line}\n")
            out.flush()
    stream.close()


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each still-running process group we started, then SIGKILL after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return
        for p in alive:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(p.poll() is None for p in alive):
            time.sleep(0.05)


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def launch(args: argparse.Namespace, out=sys.stdout) -> int:
    """Starts the processes, streams their prefixed output, returns the job's exit status."""
    port = args.port or free_port()
    cmd = process_command(args)
    envs = [process_env(os.environ, process_id=i, num_processes=args.processes, port=port,
                        devices_per_process=args.devices_per_process) for i in range(args.processes)]
    if args.dry_run:
        keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS", "XLA_FLAGS")
        for env in envs:
            assigns = " ".join(f"{k}={shlex.quote(env[k])}" for k in keys)
            out.write(f"{assigns} {shlex.join(cmd)}\n")
        return 0

    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for i, env in enumerate(envs):
        # Own session per process, so stopping it also stops its children (data workers).
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", out, lock), daemon=True)
        t.start()
        pumps.append(t)

    status = 0
    deadline = time.time() + args.timeout if args.timeout else None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                status = _exit_status(code)
                with lock:
                    out.write(f"[launch] process {i} exited with status {code}; stopping the others\n")
                break
            if all(c == 0 for c in codes):
                break
            if deadline and time.time() > deadline:
                status = 124
                with lock:
                    out.write(f"[launch] timeout after {args.timeout}s; stopping all processes\n")
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop(procs, args.grace)
        for t in pumps:
            t.join(timeout=5)
    return status


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/local.py", description=__doc__.split("\n\n")[0],
        usage="%(prog)s --processes N [--devices-per-process M] [options] -- <train args>")
    parser.add_argument("--processes", type=int, required=True, help="number of processes (hosts)")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="fake CPU devices per process (XLA_FLAGS device count)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--module", default="embedder.train", help="python module each process runs")
    parser.add_argument("--python", default=sys.executable, help="interpreter (default: this one)")
    parser.add_argument("--command", action="store_true",
                        help="run the words after `--` as the full command instead of `python -m MODULE`")
    parser.add_argument("--timeout", type=float, default=0, help="stop everything after this many seconds")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping processes")
    parser.add_argument("--dry-run", action="store_true", help="print each process's command and exit")
    if "--" in argv:
        cut = argv.index("--")
        own, rest = argv[:cut], argv[cut + 1:]
    else:
        own, rest = argv, []
    args = parser.parse_args(own)
    args.args = rest
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    if args.devices_per_process < 1:
        parser.error(f"--devices-per-process must be >= 1, got {args.devices_per_process}")
    return args


def main(argv: list[str] | None = None) -> int:
    return launch(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
