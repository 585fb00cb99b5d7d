"""A model's projection dots alone: XLA:CPU (as our f32 and bf16 executables compile them) vs torch.

    .venv/bin/python bench/dots.py --model gemma3-270m --rows 4096 --reps 7 [--out dots.json]

For each projection of one layer of `--model` (q, k, v, o, the MLP's gate/up and down) at `--rows`
tokens (batch x length), times on random inputs, interleaved (A, B, C, A, B, C, ...):

- `torch_f32` / `torch_bf16`: `x @ w` in torch (oneDNN / MKL; bf16 in, bf16 out), what
  sentence-transformers' f32 and bf16-weight encoders run;
- `ours_f32`: the f32 dot in an executable compiled as our f32 ones are (XLA's own dot emitter);
- `ours_f32_ynn`: the same f32 dot in YNNPACK (`xla_cpu_flags.YNN_DOTS`);
- `ours_bf16`: `model.einsum.accumulating_einsum` (bf16 in, f32 accumulation, bf16 out) compiled as
  our bf16 executables are (`xla_cpu_flags.compiler_options`: YNNPACK dots), what the bf16 model runs;
- `ours_bf16_f32_out`: the same dot without the rounding to bf16 (how much of `ours_bf16` is the dot).

Reports median ms and GFLOP/s per dot, ours / torch ratios, and the dots of one whole forward
(each layer's projections x layers): where the time of a bf16 or f32 encode can and cannot go.
Needs the torch extra; weights are random (speed does not depend on them), so no model download.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import measure  # noqa: F401  (sets the environment before JAX is imported)

import numpy as np

CONTESTANTS = ("torch_f32", "ours_f32", "ours_f32_ynn", "torch_bf16", "ours_bf16", "ours_bf16_f32_out")


def projection_shapes(config) -> dict[str, tuple[int, int, int]]:
    """`name -> (K, N, count per layer)` of one layer's projections, x `[rows, K]` @ w `[K, N]`."""
    d, n, kv, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    return {"q": (d, n * h, 1), "k": (d, kv * h, 1), "v": (d, kv * h, 1), "o": (n * h, d, 1),
            "gate_up": (d, config.mlp_dim, 2), "down": (config.mlp_dim, d, 1)}


def _contestants(rows: int, k: int, n: int):
    import jax
    import jax.numpy as jnp
    import torch

    from embedder import xla_cpu_flags
    from embedder.model.einsum import accumulating_einsum

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    bf16_opts = xla_cpu_flags.compiler_options(jnp.bfloat16, jax.default_backend())
    jx, jw = jax.device_put(x), jax.device_put(w)
    jxb, jwb = jx.astype(jnp.bfloat16), jw.astype(jnp.bfloat16)
    f32_opts = xla_cpu_flags.compiler_options(jnp.float32, jax.default_backend())
    f32 = jax.jit(lambda a, b: jnp.dot(a, b), compiler_options=f32_opts).lower(jx, jw).compile()
    f32_ynn = jax.jit(lambda a, b: jnp.dot(a, b), compiler_options=xla_cpu_flags.YNN_DOTS).lower(jx, jw).compile()
    bf16 = jax.jit(lambda a, b: accumulating_einsum("md,dn->mn", a, b),
                   compiler_options=bf16_opts).lower(jxb, jwb).compile()
    bf16_f32 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32),
                       compiler_options=bf16_opts).lower(jxb, jwb).compile()
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    txb, twb = tx.bfloat16(), tw.bfloat16()
    runs = {
        "torch_f32": lambda: tx @ tw,
        "ours_f32": lambda: f32(jx, jw).block_until_ready(),
        "ours_f32_ynn": lambda: f32_ynn(jx, jw).block_until_ready(),
        "torch_bf16": lambda: txb @ twb,
        "ours_bf16": lambda: bf16(jxb, jwb).block_until_ready(),
        "ours_bf16_f32_out": lambda: bf16_f32(jxb, jwb).block_until_ready(),
    }
    ref = x.astype(np.float64) @ w.astype(np.float64)
    scale = float(np.abs(ref).max())
    errors = {"torch_f32": (tx @ tw).numpy(), "ours_f32": np.asarray(runs["ours_f32"]()),
              "ours_f32_ynn": np.asarray(runs["ours_f32_ynn"]()),
              "torch_bf16": (txb @ twb).float().numpy(), "ours_bf16": np.asarray(runs["ours_bf16"](), np.float32)}
    errors = {name: float(np.abs(out - ref).max()) / scale for name, out in errors.items()}
    return runs, errors


def run(model: str, rows: int, reps: int, log=print) -> dict:
    import torch

    from embedder.model.config import get_model_config

    config = get_model_config(model)
    result = {"model": model, "rows": rows, "reps": reps, "cpu": measure.cpu_info(),
              "torch_threads": torch.get_num_threads(), "dots": {}}
    forward = {c: 0.0 for c in CONTESTANTS}
    for name, (k, n, count) in projection_shapes(config).items():
        runs, errors = _contestants(rows, k, n)
        with torch.inference_mode():
            for fn in runs.values():   # warm-up: first calls allocate and pack
                fn()
            times = {c: [] for c in CONTESTANTS}
            for _ in range(reps):
                for c in CONTESTANTS:
                    time.sleep(0.05)   # let the other library's idle threads stop spinning
                    t0 = time.perf_counter()
                    runs[c]()
                    times[c].append(time.perf_counter() - t0)
        flops = 2 * rows * k * n
        med = {c: statistics.median(t) for c, t in times.items()}
        row = {"k": k, "n": n, "per_layer": count, "gflop": flops / 1e9,
               "ms": {c: round(v * 1e3, 3) for c, v in med.items()},
               "ms_min_max": {c: [round(min(t) * 1e3, 3), round(max(t) * 1e3, 3)] for c, t in times.items()},
               "gflops": {c: round(flops / v / 1e9, 1) for c, v in med.items()},
               "ours_f32_over_torch_f32": round(med["torch_f32"] / med["ours_f32"], 3),
               "ours_bf16_over_torch_bf16": round(med["torch_bf16"] / med["ours_bf16"], 3),
               "max_rel_error_vs_f64": errors}
        result["dots"][name] = row
        for c in CONTESTANTS:
            forward[c] += med[c] * count * config.num_layers
        log(f"{name:8s} [{rows}, {k}] x [{k}, {n}]  " + "  ".join(
            f"{c} {row['ms'][c]:.1f} ms ({row['gflops'][c]:.0f})" for c in CONTESTANTS))
    result["forward_dots_s"] = {c: round(v, 3) for c, v in forward.items()}
    result["forward_ratio"] = {"f32": round(forward["torch_f32"] / forward["ours_f32"], 3),
                               "bf16": round(forward["torch_bf16"] / forward["ours_bf16"], 3)}
    log(f"one forward's dots ({config.num_layers} layers), s: {result['forward_dots_s']}; "
        f"speed vs torch (>1: ours faster): {result['forward_ratio']}")
    return result


def main(argv=None) -> None:
    from embedder.model.config import MODEL_NAMES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m", choices=MODEL_NAMES,
                   help="a model config (embedder.model.config); only its shapes are used")
    p.add_argument("--rows", type=int, default=4096, help="tokens per dot: batch x length (default 32 x 128)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", help="also write the result here (JSON)")
    args = p.parse_args(argv)
    if args.rows < 1 or args.reps < 1:
        p.error("--rows and --reps must be >= 1")
    measure.tune()
    result = run(args.model, args.rows, args.reps)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
