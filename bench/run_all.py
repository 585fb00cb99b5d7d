"""`make bench`: matmul peak, encode and train-step side by side with sentence-transformers,
utilisation, and the gradient-cache benchmark; writes JSON and a markdown table.

    .venv/bin/python bench/run_all.py                 # quick: 512 texts, 3 reps (~10 min idle box)
    .venv/bin/python bench/run_all.py --full          # 2048 texts, lengths 128/256, 5 reps
    .venv/bin/python bench/run_all.py --texts 256 --reps 3 --train-lengths 64 --no-grad-cache

Each part runs in its own process on the one real CPU device.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import measure

HERE = pathlib.Path(__file__).resolve().parent


def _sub(script: str, args: list[str], out: pathlib.Path) -> dict:
    cmd = [sys.executable, str(HERE / script)] + args + ["--out", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def _fmt(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def table(res: dict) -> str:
    peak32, peak16 = res["matmul_gflops"]["float32"] * 1e9, res["matmul_gflops"]["bfloat16"] * 1e9
    lines = [f"f32 matmul peak {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s "
             f"(jnp 2048^3, median); load average at start {res['load_start']}, end {res['load_end']}", ""]
    enc = res.get("encode")
    if enc:
        lines += ["Encode (all-MiniLM-L6-v2, %d Debian texts, batch %d): seconds median (min-max), "
                  "real tokens/s, speed-up over sentence-transformers median (min-max), utilisation "
                  "(forward model FLOPs on real tokens / matmul peak of the compute dtype)" % (enc["texts"], enc["batch"]),
                  "", "| max len | who | seconds | real tok/s | x ST | util | check |", "|---|---|---|---|---|---|---|"]
        for length, r in enc["lengths"].items():
            for who, s in r["seconds"].items():
                ratio = _fmt(r["ratio_vs_st"][who]) if who in r["ratio_vs_st"] else "1"
                peak = peak16 if who.startswith("ours") and "bf16" in who else peak32
                check = (f"max abs diff {r['max_abs_diff_vs_st']:.1e}" if who == "ours_f32" else
                         f"min cos {r['bf16_min_cosine_vs_f32']:.5f}" if who == "ours_bf16" else "")
                lines.append(f"| {length} | {who} | {_fmt(s)} | {r['real_tokens'] / s['median']:.0f} | {ratio} | "
                             f"{r['model_flops'] / s['median'] / peak:.0%} | {check} |")
        lines.append("")
    tr = res.get("train")
    if tr:
        lines += ["Train step (64 triples, one hard negative, Matryoshka MNRL, AdamW): seconds median "
                  "(min-max), tokens/s, speed-up, peak RSS of the contestant's own process (GiB; each runs alone, "
                  "`train_step.py --isolate`), utilisation (train FLOPs on real tokens)",
                  "", "| seq | dtype | who | step s | real tok/s | padded tok/s | x ST | peak RSS | util |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in tr["configs"].values():
            peak = peak16 if r["dtype"] == "bfloat16" else peak32
            for who, s in r["seconds"].items():
                key = "ratio_vs_st" if who == "ours" else f"ratio_{who}_vs_st"
                ratio = _fmt(r[key]) if key in r else "1"
                lines.append(f"| {r['seq']} | {r['dtype']} | {who} | {_fmt(s)} | {r['real_tokens'] / s['median']:.0f} | "
                             f"{r['padded_tokens'][who] / s['median']:.0f} | {ratio} | {r['peak_rss_gib'][who]} | "
                             f"{r['model_flops_real'] / s['median'] / peak:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="2048 texts, 5 repetitions everywhere")
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--lengths", default="128,256", help="encode max lengths")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--train-lengths", default="64,128")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-encode", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-grad-cache", action="store_true")
    p.add_argument("--results", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.full:
        args.texts, args.reps = 2048, max(args.reps, 5)
    out = pathlib.Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    res = {"load_start": measure.load_average(), "args": vars(args)}
    res["matmul_gflops"] = {d: measure.matmul_peak(d) / 1e9 for d in ("float32", "bfloat16")}
    print(f"matmul peak GFLOP/s: {res['matmul_gflops']}", flush=True)
    if not args.no_encode:
        res["encode"] = _sub("encode.py", ["--texts", str(args.texts), "--lengths", args.lengths,
                                           "--reps", str(args.reps)], out / f"encode-{stamp}.json")
    if not args.no_train:
        res["train"] = _sub("train_step.py", ["--lengths", args.train_lengths, "--dtypes", args.dtypes,
                                              "--reps", str(args.reps), "--isolate"], out / f"train-{stamp}.json")
    if not args.no_grad_cache:
        cmd = [sys.executable, str(HERE / "grad_cache.py"), "--batches", "256,512", "--chunk-rows", "128",
               "--query-len", "8", "--doc-len", "16", "--steps", "1", "--out", str(out / f"grad_cache-{stamp}.json")]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    res["load_end"] = measure.load_average()
    text = table(res)
    (out / f"summary-{stamp}.json").write_text(json.dumps(res, indent=1))
    (out / f"summary-{stamp}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    measure.tune(restart=False)   # for the matmul peak; each benchmark tunes its own process
    sys.exit(main())
