"""Int8 encode on CPU against our f32 encode and sentence-transformers' f32, on the same weights.

    .venv/bin/python bench/quant_encode.py --texts 512 --lengths 128 --reps 5 --out q.json
    .venv/bin/python bench/quant_encode.py --model gemma3-270m --texts 512 --lengths 128 --reps 3

`--model` (`bench_models.py`): all-MiniLM-L6-v2 (default), the real Gemma 3 270M or its tiny
twin. Encodes shipped Debian descriptions (batch 64) three ways in one process, interleaved:
`Embedder.load(m)` (f32), `Embedder.load(m, quantized_compute="int8")` (int8 weights per output
channel, int8 activations per token, s8 x s8 -> s32 dots that XLA:CPU gives YNNPACK) and
`SentenceTransformer(device="cpu")` (f32). Reports seconds (median), real tokens/s, the speed-up
of each of ours over sentence-transformers, and the int8 embeddings' cosine to the f32 ones.
One process for all three (unlike encode.py): the int8 and f32 models share its malloc arena.
"""

from __future__ import annotations

import argparse
import json
import time

import measure  # noqa: F401  (sets the environment before JAX is imported)

import numpy as np

import bench_models


def run(texts_n: int, lengths: list[int], reps: int, batch: int, model_name: str = "minilm", log=print) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedder.inference import Embedder

    model = bench_models.get(model_name)
    texts = measure.debian_texts(texts_n)
    ours = {"ours_f32": Embedder.load(model.ours),
            "ours_int8": Embedder.load(model.ours, quantized_compute="int8")}
    st = SentenceTransformer(str(model.hf), device="cpu")
    result = {"model": model_name, "texts": texts_n, "batch": batch, "cpu": measure.cpu_info(),
              "torch_threads": torch.get_num_threads(), "lengths": {}}
    for length in lengths:
        st.max_seq_length = length
        seqs = ours["ours_f32"].tokenizer.encode(texts, max_length=length)
        real_tokens = sum(len(s) for s in seqs)
        first_call, emb = {}, {}
        for name, m in ours.items():
            t0 = time.perf_counter()   # the first call compiles every bucket it meets
            emb[name] = m.encode(texts, role="document", batch_size=batch, max_length=length)
            first_call[name] = time.perf_counter() - t0
        ref = st.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
        check = {"f32_max_abs_diff_vs_st": float(np.abs(emb["ours_f32"] - ref).max()),
                 "int8_min_cosine_vs_f32": float(np.min(np.sum(emb["ours_int8"] * emb["ours_f32"], axis=1))),
                 "int8_mean_cosine_vs_f32": float(np.mean(np.sum(emb["ours_int8"] * emb["ours_f32"], axis=1)))}
        log(f"max length {length}: {real_tokens} real tokens; {check}")
        runs = {"st": lambda: st.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)}
        for name, m in ours.items():
            runs[name] = (lambda m=m: m.encode(texts, role="document", batch_size=batch, max_length=length))
        times = measure.interleave(runs, reps, log)
        seconds = {k: measure.summary(v) for k, v in times.items()}
        result["lengths"][str(length)] = {
            "real_tokens": real_tokens, **check, "first_call_s": first_call, "seconds": seconds,
            "tokens_per_s": {k: real_tokens / v["median"] for k, v in seconds.items()},
            "ratio_vs_st": {k: measure.summary([s / o for s, o in zip(times["st"], times[k])])
                            for k in ours},
            "int8_vs_f32": measure.summary([f / i for f, i in zip(times["ours_f32"], times["ours_int8"])]),
            "load_average": measure.load_average()}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", choices=bench_models.NAMES)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--lengths", default="128")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    measure.tune()
    result = run(args.texts, [int(x) for x in args.lengths.split(",")], args.reps, args.batch, args.model)
    for length, r in result["lengths"].items():
        s = r["seconds"]
        print(f"L={length}: st {s['st']['median']:.2f} s, ours f32 {s['ours_f32']['median']:.2f} s, "
              f"ours int8 {s['ours_int8']['median']:.2f} s; vs st: f32 {r['ratio_vs_st']['ours_f32']['median']:.2f}x, "
              f"int8 {r['ratio_vs_st']['ours_int8']['median']:.2f}x; int8 min cosine {r['int8_min_cosine_vs_f32']:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
