"""Gradient cache benchmark: step time and peak memory, cached vs full-batch, as the batch grows.

    .venv/bin/python bench/grad_cache.py                        # batches 256,1024,4096 on the tiny model
    .venv/bin/python bench/grad_cache.py --batches 256,512 --chunk-rows 128 --out gc.json

Each (batch, mode) runs in its own subprocess so that peak RSS is that
configuration's alone. Reports XLA's compiled memory analysis (temporaries per
device: the activations a step keeps alive), peak process RSS and the median
step time. Cached mode uses `batch / chunk_rows` chunks, so its activation
memory should stay nearly flat while the full-batch step grows with the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _batch(b: int, k: int, lq: int, ld: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = lambda *s: rng.integers(1, vocab, s).astype(np.int32)
    ones = lambda *s: np.ones(s, np.int32)
    batch = {"query_ids": ids(b, lq), "query_mask": ones(b, lq), "positive_ids": ids(b, ld),
             "positive_mask": ones(b, ld),
             "query_hash": np.stack([np.arange(b), np.zeros(b)], 1).astype(np.uint32),
             "positive_hash": np.stack([np.arange(b) + b, np.zeros(b)], 1).astype(np.uint32),
             "dataset": np.zeros(b, np.int32)}
    if k:
        batch.update({"negative_ids": ids(b, k, ld), "negative_mask": ones(b, k, ld),
                      "negatives_valid": np.ones((b, k), bool),
                      "negative_hash": (np.arange(b * k).reshape(b, k, 1) + np.array([3 * b, 0])).astype(np.uint32)})
    return batch


def run_one(args) -> dict:
    """One configuration in this process: compile, run, measure."""
    # Only the measuring subprocess imports JAX and the library; the driver process stays light.
    from embedder.cpu_tuning import tune_command

    tune_command()
    import jax

    from embedder import sharding
    from embedder.train.config import base_config, model_config_dict
    from embedder.train.setup import build_run

    c = base_config()   # LR 1e-4 with cosine decay over 100 steps, no weight decay or clipping
    c.model = model_config_dict(args.model)
    c.batch_size, c.total_steps = args.one_batch, 100
    c.grad_cache_chunks = args.one_batch // args.chunk_rows if args.one_mode == "cached" else 0
    c.data.query_max_length, c.data.document_max_length = args.query_len, args.doc_len
    c.optimizer.update({"learning_rate": 1e-4, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip_norm": 0.0})
    assembly = build_run(c)
    chunks, mesh = c.grad_cache_chunks, assembly.mesh
    batch = _batch(args.one_batch, args.negatives, args.query_len, args.doc_len, assembly.model.config.vocab_size)
    with jax.set_mesh(mesh):
        state = assembly.init_state(jax.random.key(0))
        step = assembly.step
        global_batch = sharding.host_to_global(batch, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, global_batch, jax.random.key(1)).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        times = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            state, metrics = compiled(state, global_batch, jax.random.key(i))
            jax.block_until_ready(metrics)
            if i:  # the first call includes one-off allocation
                times.append(time.perf_counter() - t0)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"batch": args.one_batch, "mode": args.one_mode, "chunks": chunks, "device": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(), "compile_s": round(compile_s, 2),
            "step_s": round(statistics.median(times), 4),
            "temp_mib": round(mem.temp_size_in_bytes / 2**20, 2) if mem else None,
            "argument_mib": round(mem.argument_size_in_bytes / 2**20, 2) if mem else None,
            "peak_rss_mib": round(rss_kib / 1024, 1), "loss": float(metrics["loss"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--batches", default="256,1024,4096")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per gradient-cache chunk")
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--query-len", type=int, default=16)
    p.add_argument("--doc-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="")
    p.add_argument("--one-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one-mode", choices=("full", "cached"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_batch:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        if b % args.chunk_rows:
            p.error(f"batch {b} is not a multiple of --chunk-rows {args.chunk_rows}")
        for mode in ("full", "cached"):
            cmd = [sys.executable, __file__, "--one-batch", str(b), "--one-mode", mode] + [
                a for a in (argv if argv is not None else sys.argv[1:])]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"batch {b} {mode}: subprocess failed (rc {out.returncode})")
            row = json.loads(line[0][len("RESULT "):])
            rows.append(row)
            print(f"batch {row['batch']:5d} {row['mode']:6s} chunks {row['chunks']:3d}  step {row['step_s']:8.3f}s  "
                  f"temp {row['temp_mib']:9.1f} MiB  peak RSS {row['peak_rss_mib']:8.1f} MiB  "
                  f"compile {row['compile_s']:6.1f}s  loss {row['loss']:.4f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
