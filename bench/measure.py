"""Shared benchmark plumbing: one real CPU device, interleaved timing, RSS peaks, matmul peak, texts.

Import this before JAX: it removes the tests' fake device count so benchmarks run on the
one real CPU device.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import statistics
import threading
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "debian" / "tasks" / "debian_retrieval" / "corpus.jsonl.gz"
PAIRS = REPO / "data" / "debian" / "train_pairs.jsonl.gz"

os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                 os.environ.get("XLA_FLAGS", "")).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tune(restart: bool = True) -> None:
    """A benchmark's main runs with the CPU tuning the train CLI gets (embedder/cpu_tuning.py),
    by default after the restart with the malloc tunables."""
    from embedder.cpu_tuning import tune_command

    tune_command(restart=restart)


def peer_env() -> dict:
    """The environment for a process that runs only the peer (sentence-transformers): glibc's
    and XLA's defaults, as its users get them (the tuning sets no environment variable; the opt-out
    also keeps an `embedder` import there untuned)."""
    from embedder import xla_cpu_flags

    return dict(os.environ, **{xla_cpu_flags.OPT_OUT_ENV: "0"})


def load_average() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())


def read_jsonl(path: pathlib.Path, limit: int | None = None) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def debian_texts(n: int) -> list[str]:
    """The first `n` Debian package descriptions of the shipped retrieval corpus."""
    texts = [r["text"] for r in read_jsonl(CORPUS, n)]
    if len(texts) < n:
        raise SystemExit(f"{CORPUS} holds only {len(texts)} texts; ask for --texts <= {len(texts)}")
    return texts


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


def interleave(runs: dict[str, Callable[[], None]], reps: int, log=print) -> dict[str, list[float]]:
    """Times each callable `reps` times in the order A, B, C, A, B, C, ... (so load from
    other processes hits every contestant alike); returns seconds per call."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            log(f"  rep {r + 1}/{reps} {name:<14s} {times[name][-1]:8.2f} s  load {load_average()[0]}")
    return times


def current_rss() -> int:
    """Resident bytes of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Context manager sampling RSS every few ms: `.peak` and `.before` in bytes, so
    `peak - before` is the memory one call needs on top of what was already resident."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.before = self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.before = self.peak = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def matmul_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """This CPU's matmul rate in FLOP/s: median of `reps` jitted `n^3` jnp matmuls
    (bf16 inputs accumulate in f32, as the model's bf16 compute does)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    from embedder import xla_cpu_flags

    # The f32 options for both dtypes: XLA's own dot emitter, what matmul_peak has always timed.
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32),
                compiler_options=xla_cpu_flags.compiler_options(jnp.float32, jax.default_backend()))
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def fmt_row(cells, widths) -> str:
    return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"


def cpu_info() -> dict:
    """The host's CPU model, core count and the flags that decide CPU matmul speed, so figures from
    different hosts are never mixed (`/proc/cpuinfo`; empty fields elsewhere)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}
