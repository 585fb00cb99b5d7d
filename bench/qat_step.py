"""QAT train step: seconds per step and memory, plain (float) vs quantisation-aware (int8, int4, mixed).

    .venv/bin/python bench/qat_step.py                             # the tiny config, 64 triples
    .venv/bin/python bench/qat_step.py --vocab 262144              # tiny width, Gemma 3's vocabulary
    .venv/bin/python bench/qat_step.py --model gemma3-270m --batch 32 --query-len 32 --doc-len 128 \
        --reps 3 --out qat.json                                    # add --grad-cache 4: the cached step

The project's train step (`build_run`: jitted, donated, AdamW on the Matryoshka contrastive
loss) on one batch of random (query, positive, hard negative) ids, the same for every variant;
`--model` is a named architecture (`embedder.model.config.MODEL_NAMES`: `tiny`, `gemma3-270m`,
...) at random init, since the weights' values do not change the cost. Variants: `plain`
(`model.quant_scheme` ""), and `int8`, `int4`, `mixed` (`quant_block` `--block`). Each variant
runs in its own process (so its peak RSS, VmHWM, is its own): compile, one warm-up step, then
`--reps` timed steps; seconds are their median (min-max). Memory: XLA's compiled memory analysis
of the step (temporaries, arguments, and their sum), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import measure  # noqa: F401  (sets the environment before JAX is imported)

VARIANTS = ("plain", "int8", "int4", "mixed")


def run_one(args) -> dict:
    """One variant in this process: build, compile, time."""
    import jax

    from embedder import sharding
    from embedder.train.config import base_config, model_config_dict
    from embedder.train.setup import build_run
    from grad_cache import _batch

    scheme = "" if args.one == "plain" else args.one
    c = base_config()
    overrides = {"vocab_size": args.vocab} if args.vocab else {}
    c.model = model_config_dict(args.model, quant_scheme=scheme, quant_block=args.block, dtype=args.dtype,
                                **overrides)
    c.batch_size, c.total_steps, c.grad_cache_chunks = args.batch, 1000, args.grad_cache
    c.data.query_max_length, c.data.document_max_length = args.query_len, args.doc_len
    c.optimizer.update({"learning_rate": 1e-5, "warmup_steps": 0, "schedule": "constant",
                        "frozen": tuple(f for f in args.frozen.split(",") if f)})
    assembly = build_run(c, jax.devices()[:1])
    batch = _batch(args.batch, args.negatives, args.query_len, args.doc_len, assembly.model.config.vocab_size)
    with jax.set_mesh(assembly.mesh):
        state = assembly.init_state(jax.random.key(0))
        global_batch = sharding.host_to_global(batch, assembly.mesh)
        t0 = time.perf_counter()
        compiled = assembly.step.lower(state, global_batch, jax.random.key(1)).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        times = []
        for i in range(args.reps + 1):   # the first call includes one-off allocation
            t0 = time.perf_counter()
            state, metrics = compiled(state, global_batch, jax.random.key(i))
            jax.block_until_ready((state, metrics))
            if i:
                times.append(time.perf_counter() - t0)
    mib = lambda b: round(b / 2**20, 2)
    temp, arg = (int(mem.temp_size_in_bytes), int(mem.argument_size_in_bytes)) if mem else (None, None)
    return {"variant": args.one, "quant_scheme": scheme, "device": jax.devices()[0].device_kind,
            "compile_s": round(compile_s, 2), "seconds": measure.summary(times),
            "xla_temp_mib": mib(temp) if mem else None, "xla_argument_mib": mib(arg) if mem else None,
            "xla_temp_plus_argument_mib": mib(temp + arg) if mem else None,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "loss": float(metrics["loss"]), "load_average": measure.load_average()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a named architecture: tiny, gemma3-270m, ...")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--vocab", type=int, default=0, help="override the vocabulary size (0: the model's)")
    p.add_argument("--block", type=int, default=32, help="quant_block of the int4 leaves")
    p.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
    p.add_argument("--batch", type=int, default=64, help="triples per step")
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--query-len", type=int, default=16)
    p.add_argument("--doc-len", type=int, default=32)
    p.add_argument("--grad-cache", type=int, default=0, help="gradient-cache chunks (0: off)")
    p.add_argument("--frozen", default="", help="comma-separated optimizer.frozen regexes")
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant (median)")
    p.add_argument("--out", default="")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    from embedder.model.config import MODEL_NAMES

    if args.model not in MODEL_NAMES:
        p.error(f"--model {args.model!r}: choose from {', '.join(MODEL_NAMES)}")
    variants = args.variants.split(",")
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants takes any of {', '.join(VARIANTS)}; got {args.variants!r}")
    result = {"model": args.model, "vocab": args.vocab or None, "batch": args.batch, "negatives": args.negatives,
              "query_len": args.query_len, "doc_len": args.doc_len, "dtype": args.dtype, "block": args.block,
              "grad_cache": args.grad_cache, "frozen": args.frozen, "reps": args.reps, "cpu": measure.cpu_info(),
              "variants": {}}
    passed = list(argv if argv is not None else sys.argv[1:])
    for name in variants:
        proc = subprocess.run([sys.executable, __file__, *passed, "--one", name], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: subprocess failed (rc {proc.returncode})")
        row = json.loads(line[0][len("RESULT "):])
        result["variants"][name] = row
        print(f"{name:6s} step {row['seconds']['median']:8.4f} s ({row['seconds']['min']:.4f}-"
              f"{row['seconds']['max']:.4f})  XLA temp {row['xla_temp_mib']:9.2f} MiB  "
              f"temp+args {row['xla_temp_plus_argument_mib']:9.2f} MiB  peak RSS {row['peak_rss_mib']:8.1f} MiB  "
              f"compile {row['compile_s']:6.1f} s  loss {row['loss']:.4f}", flush=True)
    if "plain" in result["variants"]:
        base = result["variants"]["plain"]["seconds"]["median"]
        result["ratio_vs_plain"] = {n: round(r["seconds"]["median"] / base, 3)
                                    for n, r in result["variants"].items() if n != "plain"}
        print("step time / plain: " + ", ".join(f"{n} {v:.2f}x" for n, v in result["ratio_vs_plain"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    measure.tune()
    main()
