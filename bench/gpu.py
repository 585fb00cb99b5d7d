"""Accelerator train-step benchmark: EmbeddingGemma-300M-size encoder, seq 512, bf16, MFU.

    python bench/gpu.py                      # on one GPU (H100/H200): about 2-4 minutes
    python bench/gpu.py --smoke              # tiny config on CPU, proves the script runs

Random-init `embeddinggemma-300m` (bf16 compute, f32 params and AdamW), batches of
(query, positive, hard negative) triples of random tokens, all at `--seq`. Reports
train-step time, tokens/s and model FLOPs utilisation against `--peak-tflops`
(H100 SXM / H200 bf16 dense: 989). FLOPs: 6 * non-embedding params * tokens +
12 * layers * S^2 * heads * head_dim per sequence (bench/flops.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import measure  # noqa: F401  (first: drops fake CPU device counts; GPUs are used when present)

import jax
import numpy as np

import flops
from embedder import sharding
from embedder.train.config import base_config, model_config_dict
from embedder.train.setup import build_run


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = lambda *s: rng.integers(2, vocab, s).astype(np.int32)
    hashes = lambda n, off: np.stack([np.arange(n) + off, np.zeros(n)], 1).astype(np.uint32)
    return {"query_ids": ids(batch, seq), "query_mask": np.ones((batch, seq), np.int32),
            "positive_ids": ids(batch, seq), "positive_mask": np.ones((batch, seq), np.int32),
            "negative_ids": ids(batch, 1, seq), "negative_mask": np.ones((batch, 1, seq), np.int32),
            "negatives_valid": np.ones((batch, 1), bool), "query_hash": hashes(batch, 0),
            "positive_hash": hashes(batch, batch), "negative_hash": hashes(batch, 2 * batch)[:, None]}


def train_config(model_name: str, batch: int, seq: int, remat: str, attention: str):
    """The benchmarked run as a train config: constant LR 1e-4, no decay or clipping, the model's
    MRL dims, global hard negatives, the default (data, fsdp, tensor) = (-1, 1, 1) mesh."""
    c = base_config()
    c.model = model_config_dict(model_name, dtype="bfloat16", param_dtype="float32", remat=remat,
                                attention_impl=attention)
    c.batch_size, c.total_steps = batch, 1000
    c.data.query_max_length = c.data.document_max_length = seq
    c.optimizer.update({"learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant",
                        "weight_decay": 0.0, "grad_clip_norm": 0.0})
    c.loss.global_hard_negatives = True
    return c


def run(model_name: str, batch: int, seq: int, steps: int, peak_tflops: float, remat: str,
        attention: str) -> dict:
    assembly = build_run(train_config(model_name, batch, seq, remat, attention))
    cfg, mesh = assembly.model.config, assembly.mesh
    batch_np = make_batch(batch, seq, cfg.vocab_size)
    with jax.set_mesh(mesh):
        state = assembly.init_state(jax.random.key(0))
        step = assembly.step
        global_batch = sharding.host_to_global(batch_np, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, global_batch, jax.random.key(1)).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = compiled(state, global_batch, jax.random.key(1))  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, global_batch, jax.random.key(2 + i))
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = 3 * batch * seq
    model_flops = flops.total_flops(cfg, [seq] * (3 * batch), train=True)
    mem = compiled.memory_analysis()
    return {"model": model_name, "device": jax.devices()[0].device_kind, "batch": batch, "seq": seq,
            "remat": remat, "attention_impl": attention, "compile_s": round(compile_s, 1),
            "step_s": {"median": step_s, "min": min(times), "max": max(times), "n": len(times)},
            "tokens_per_s": tokens / step_s, "model_tflops_per_step": model_flops / 1e12,
            "mfu": model_flops / step_s / (peak_tflops * 1e12), "peak_tflops": peak_tflops,
            "xla_temp_gib": round(mem.temp_size_in_bytes / 2**30, 2) if mem else None,
            "loss": float(metrics["loss"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny config, seq 32, batch 4, 2 steps (CPU)")
    p.add_argument("--model", default="embeddinggemma-300m")
    p.add_argument("--batch", type=int, default=32, help="triples per step")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable"))
    p.add_argument("--attention", default="dot_product_attention",
                   choices=("xla", "dot_product_attention", "cudnn"))
    p.add_argument("--peak-tflops", type=float, default=989.0, help="chip's dense bf16 peak")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.seq, args.steps = "tiny", 4, 32, 2
    res = run(args.model, args.batch, args.seq, args.steps, args.peak_tflops, args.remat, args.attention)
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    measure.tune(restart=False)
    sys.exit(main())
