"""Attention core alone: our einsum attention vs torch's fused and unfused CPU attention.

    .venv/bin/python bench/attention.py --batch 64 --length 128 --heads 12 --head-dim 32 --reps 9

Times the part of self-attention between the projections (q.k logits, key mask, softmax,
value product) on random f32 inputs with a random number of real keys per row:
`Attention._einsum_attention` (what the model runs on CPU), jitted, against
`torch.nn.functional.scaled_dot_product_attention` (torch's fused CPU kernel, what
sentence-transformers' BERT uses) and the same steps written out in torch. Interleaved;
medians (min-max) in ms; reports the largest difference of each torch output from ours
(every row: padding queries see the same real keys on both sides).
"""

from __future__ import annotations

import argparse
import json
import sys

import measure  # noqa: F401  (sets the environment before JAX is imported)

import numpy as np


def run(batch: int, length: int, heads: int, head_dim: int, reps: int, log=print) -> dict:
    import jax
    import torch
    import torch.nn.functional as F

    from embedder.model import ModelConfig
    from embedder.model.attention import Attention, attention_mask

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32) for _ in range(3))
    real = rng.integers(max(1, length // 4), length + 1, batch)
    key_mask = np.arange(length)[None] < real[:, None]
    scale = head_dim ** -0.5
    cfg = ModelConfig(family="bert", hidden_size=heads * head_dim, num_heads=heads, num_kv_heads=heads,
                      head_dim=head_dim, num_layers=1, mlp_dim=4 * heads * head_dim, vocab_size=8)
    module = Attention(cfg)

    @jax.jit
    def ours(q, k, v, key_mask):
        return module.apply({}, q, k, v, attention_mask(key_mask), scale, True,
                            method=Attention._einsum_attention)

    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))  # [B, N, T, H]
    bias = torch.zeros(batch, 1, 1, length).masked_fill(~torch.from_numpy(key_mask)[:, None, None, :],
                                                        torch.finfo(torch.float32).min)

    def fused():
        return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias, scale=scale)

    def unfused():
        return torch.softmax(tq @ tk.transpose(-1, -2) * scale + bias, dim=-1) @ tv

    jq, jk, jv, jm = (jax.device_put(x) for x in (q, k, v, key_mask))
    with torch.inference_mode():
        outs = {"ours": np.asarray(ours(jq, jk, jv, jm)),
                "torch_sdpa": fused().transpose(1, 2).numpy(), "torch_unfused": unfused().transpose(1, 2).numpy()}
        diffs = {name: float(np.abs(o - outs["ours"]).max()) for name, o in outs.items() if name != "ours"}
        log(f"[{batch}, {length}, {heads}, {head_dim}]: max |torch - ours| {diffs}")
        runs = {"ours": lambda: ours(jq, jk, jv, jm).block_until_ready(),
                "torch_sdpa": fused, "torch_unfused": unfused}
        times = measure.interleave(runs, reps, log=lambda *_: None)
    ms = {name: {k: v * 1e3 if k != "n" else v for k, v in measure.summary(t).items()} for name, t in times.items()}
    for name, s in ms.items():
        log(f"  {name:<14s} {s['median']:7.1f} ms ({s['min']:.1f}-{s['max']:.1f})")
    return {"shape": [batch, length, heads, head_dim], "max_abs_diff_vs_ours": diffs, "ms": ms,
            "torch_threads": torch.get_num_threads(), "load_average": measure.load_average()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    res = run(args.batch, args.length, args.heads, args.head_dim, args.reps)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    measure.tune(restart=False)
    sys.exit(main())
