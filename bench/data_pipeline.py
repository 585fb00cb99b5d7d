"""Benchmark: training-pipeline throughput (examples/s) on the shipped Debian pairs and tokenizer.

    python bench/data_pipeline.py [--data-dir /tmp/embedder_bench_tfds] [--steps 50]

Prints one-off preparation time, then a table of examples/s for several batch shapes, with
and without the prefetch thread; compare with the train step's examples/s.
"""
from __future__ import annotations

import argparse
import time

from embedder.data.data_config import default_data_config
from embedder.data.pipeline import make_train_iterator
from embedder.data.prompts import Prompts
from embedder.data.tokenizer import load_tokenizer


def measure(config, tok, batch, steps, warmup=3):
    it = make_train_iterator(config, tokenizer=tok, prompts=Prompts(), global_batch_size=batch, seed=0)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        b = next(it)
        tokens += int(b["query_mask"].sum() + b["positive_mask"].sum())
    dt = time.perf_counter() - t
    it.close()
    return batch * steps / dt, tokens / dt


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/tmp/embedder_bench_tfds")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    tok = load_tokenizer({"kind": "sentencepiece", "file": "debian_sp8k.model"})
    config = default_data_config()
    config.data_dir = args.data_dir
    t = time.perf_counter()
    it = make_train_iterator(config, tokenizer=tok, prompts=Prompts(), global_batch_size=8, seed=0)
    print(f"prepare (first run builds array_record, later runs reuse it): {time.perf_counter() - t:.1f} s, "
          f"{it.dataset_sizes[0]} records")
    it.close()
    print(f"{'batch':>5} {'K neg':>5} {'prefetch':>8} {'examples/s':>11} {'real tokens/s':>14}")
    for batch, k, prefetch in [(32, 0, 0), (32, 0, 2), (128, 0, 2), (32, 3, 2)]:
        config.num_negatives, config.prefetch = k, prefetch
        ex, tk = measure(config, tok, batch, args.steps)
        print(f"{batch:>5} {k:>5} {prefetch:>8} {ex:>11.0f} {tk:>14.0f}")


if __name__ == "__main__":
    main()
