"""Encode throughput: embedder vs sentence-transformers on the same weights, interleaved.

    .venv/bin/python bench/encode.py --texts 2048 --lengths 128,256 --reps 5 --out enc.json
    .venv/bin/python bench/encode.py --model gemma3-270m --texts 512 --lengths 128 --reps 3

`--model` (`bench_models.py`): all-MiniLM-L6-v2 (default), the real Gemma 3 270M (our
`from-gguf` copy vs its `to-hf` folder in sentence-transformers) or its tiny random twin.

Encodes shipped Debian descriptions (batch 64) with `Embedder` in f32 and with bf16
compute, and with `SentenceTransformer(device="cpu")`; checks that the f32 embeddings
agree with sentence-transformers (max abs difference <= 1e-5) and that bf16 keeps
cosine >= 0.999 to the f32 embedding (sentence-transformers', equal to ours to ~2e-7).
Throughput counts real (non-padding) tokens.

Each of our variants runs in its own process, interleaved there with sentence-transformers
(`--variants` picks them; one variant runs in this process): the two models' buffers would
share one malloc arena (`embedder/host_memory.py`), which a user who loads one model per
process never sees. `ours_bf16_xla_dots` is bf16 compute with YNNPACK off (XLA's f32 dots).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import measure  # noqa: F401  (sets the environment before JAX is imported)

import numpy as np

import bench_models
import flops

VARIANTS = {  # name -> Embedder config overrides
    "ours_f32": {},
    "ours_bf16": {"dtype": "bfloat16"},
    "ours_bf16_xla_dots": {"dtype": "bfloat16"},
}
# XLA flags a variant's process starts with. Our bf16 executables run their dots in YNNPACK, on the
# host's bf16 matmul units (AMX / AVX512_BF16; `embedder/xla_cpu_flags.py`); `ours_bf16_xla_dots`
# is the same model with YNNPACK off (the flag set by the user wins), i.e. XLA's own f32 dots.
VARIANT_XLA_FLAGS = {"ours_bf16_xla_dots": "--xla_cpu_experimental_ynn_fusion_type="}


def run(texts_n: int, lengths: list[int], reps: int, batch: int, variant: str = "ours_f32",
        log=print, model_name: str = "minilm") -> dict:
    """Interleaves sentence-transformers with one of our `VARIANTS`, in this process."""
    import torch
    from sentence_transformers import SentenceTransformer

    from embedder.inference import Embedder

    model = bench_models.get(model_name)
    texts = measure.debian_texts(texts_n)
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: choose from {sorted(VARIANTS)}")
    ours = Embedder.load(model.ours, config_overrides=VARIANTS[variant])
    st = SentenceTransformer(str(model.hf), device="cpu")
    bf16 = VARIANTS[variant].get("dtype") == "bfloat16"
    # The bf16 peer: sentence-transformers with its weights in bf16 (torch's bf16 matmuls).
    st_bf16 = (SentenceTransformer(str(model.hf), device="cpu", model_kwargs={"torch_dtype": torch.bfloat16})
               if bf16 else None)
    result = {"model": model_name, "texts": texts_n, "batch": batch, "cpu": measure.cpu_info(),
              "torch_threads": torch.get_num_threads(), "lengths": {}}
    for length in lengths:
        st.max_seq_length = length
        if st_bf16 is not None:
            st_bf16.max_seq_length = length
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
        if st_bf16 is not None:
            st_bf16_emb = st_bf16.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
            check["st_bf16_min_cosine_vs_f32"] = float(np.min(np.sum(st_bf16_emb.astype(np.float32) * ref, axis=1)))
            runs["st_bf16"] = lambda: st_bf16.encode(texts, batch_size=batch, normalize_embeddings=True,
                                                     convert_to_numpy=True)
        times = measure.interleave(runs, reps, log)
        ratios = {variant: measure.summary([s / o for s, o in zip(times["st"], times[variant])])}
        if st_bf16 is not None:
            ratios[f"{variant}_vs_st_bf16"] = measure.summary(
                [s / o for s, o in zip(times["st_bf16"], times[variant])])
        result["lengths"][str(length)] = {
            "real_tokens": real_tokens,
            "model_flops": flops.total_flops(ours.config, [len(s) for s in seqs], train=False),
            **check, "first_call_s": {variant: compile_s},
            "seconds": {k: measure.summary(v) for k, v in times.items()},
            "ratio_vs_st": ratios,
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
            if "max_abs_diff_vs_st" in r:
                m["max_abs_diff_vs_st"] = r["max_abs_diff_vs_st"]
            for key in ("bf16_min_cosine_vs_f32", "st_bf16_min_cosine_vs_f32"):
                if key in r:
                    m[f"{key}_{variant}" if key.startswith("bf16") else key] = r[key]
            m["first_call_s"].update(r["first_call_s"])
            m["seconds"][variant] = r["seconds"][variant]
            m["seconds"][f"st_with_{variant}"] = r["seconds"]["st"]
            if "st_bf16" in r["seconds"]:
                m["seconds"][f"st_bf16_with_{variant}"] = r["seconds"]["st_bf16"]
            m["ratio_vs_st"].update(r["ratio_vs_st"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", choices=bench_models.NAMES)
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
    flags = os.environ.get("XLA_FLAGS", "")
    if len(variants) == 1 and VARIANT_XLA_FLAGS.get(variants[0], "") in flags:
        res = run(args.texts, lengths, args.reps, args.batch, variants[0], model_name=args.model)
    else:
        per = {}
        with tempfile.TemporaryDirectory() as tmp:
            for v in variants:
                out = f"{tmp}/{v}.json"
                subprocess.run([sys.executable, __file__, "--model", args.model, "--texts", str(args.texts), "--lengths",
                                args.lengths, "--reps", str(args.reps), "--batch", str(args.batch),
                                "--variants", v, "--out", out], check=True,
                               env=dict(os.environ, XLA_FLAGS=f"{flags} {VARIANT_XLA_FLAGS.get(v, '')}".strip()))
                with open(out) as f:
                    per[v] = json.load(f)
        res = merge(per)
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    measure.tune()
    sys.exit(main())
