"""The quantisation table: a model's retrieval nDCG@10 in f32, post-training int8 / int4 / mixed, and
after quantisation-aware training (QAT) int8 / int4 / mixed, with each model's size on disk.

    # the MiniLM fine-tune (its final export; the QAT runs continue its training config)
    python experiments/quantize_table.py --model workdir/minilm/train/export --workdir workdir/quant_minilm \
        --train-config experiments/minilm_finetune.py --qat-steps 40 \
        --override 'data.datasets=[{"name": "debian_mined", "files": ["workdir/minilm/train_rows.jsonl"], "weight": 1}]'
    # the Gemma 3 270M recipe's final model
    python experiments/quantize_table.py --model workdir/gemma3_270m/final --workdir workdir/quant_gemma \
        --train-config experiments/gemma3_270m.py:stage2 --qat-steps 30 --override ...

Rows: `f32` (the model as given), `ptq_<scheme>` (`python -m embedder.quantize MODEL --scheme S`),
`qat_<scheme>` (`python -m embedder.train --config TRAIN_CONFIG --config.init_from=MODEL
--config.model.quant_scheme=S --config.total_steps=QAT_STEPS`, then quantised with the scheme it
trained) and, unless `--no-control`, `f32_continued` (the same continued training without
quantisation: what the extra steps alone give). `--int8-compute` adds the f32 model encoded with
`quantized_compute="int8"`. Every row is cached in WORKDIR/results.json (rerunning continues);
the table goes to WORKDIR/table.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

DEFAULT_TASK = REPO / "data" / "debian" / "tasks" / "debian_retrieval"
SCHEMES = ("int8", "int4", "mixed")


def ndcg10(model_path, task, *, max_queries: int = 0, quantized_compute: str = "") -> float:
    """nDCG@10 at the model's full width on a retrieval task directory."""
    from embedder.evaluate.runner import evaluate_task
    from embedder.inference import Embedder

    enc = Embedder.load(model_path, quantized_compute=quantized_compute)
    result = evaluate_task(enc, task, [enc.embedding_dim], max_queries=max_queries or None)
    metrics = result["dims"][str(enc.embedding_dim)]
    return float(metrics["ndcg_at_10"])


def train_command(train_config: str, workdir: pathlib.Path, init_from, scheme: str, block: int, steps: int,
                  overrides=()) -> list[str]:
    return [sys.executable, "-m", "embedder.train", "--config", train_config, "--workdir", str(workdir),
            f"--config.init_from={init_from}", f"--config.model.quant_scheme={scheme}",
            f"--config.model.quant_block={block}", f"--config.total_steps={steps}",
            *(f"--config.{o}" for o in overrides)]


def build_table(model, workdir, *, task=DEFAULT_TASK, schemes=SCHEMES, block: int = 32, train_config: str = "",
                qat_steps: int = 0, overrides=(), control: bool = True, int8_compute: bool = False,
                max_queries: int = 0, log=print) -> dict[str, dict]:
    """Runs (or reads back) every row; returns `{row: {"ndcg@10", "bytes_on_disk", ...}}`."""
    from embedder.quantize import directory_bytes, quantize_model

    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    results_file = wd / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else {}

    def row(name, fn):
        if name in rows:
            return
        t0 = time.time()
        rows[name] = dict(fn(), wall_s=round(time.time() - t0, 1))
        log(f"{name}: {rows[name]}")
        results_file.write_text(json.dumps(rows, indent=1))

    def quantized(src, dst, scheme):
        report = quantize_model(src, dst, scheme=scheme, block=block, overwrite=True)
        return {"ndcg@10": ndcg10(dst, task, max_queries=max_queries), "bytes_on_disk": report["bytes_on_disk"]}

    def trained(name, scheme):
        run = wd / name
        cmd = train_command(train_config, run, model, scheme, block, qat_steps, overrides)
        log(" ".join(cmd))
        subprocess.run(cmd, check=True)
        return run

    params_dir = pathlib.Path(model) / "params"
    row("f32", lambda: {"ndcg@10": ndcg10(model, task, max_queries=max_queries),
                        "bytes_on_disk": directory_bytes(params_dir) if params_dir.is_dir() else None})
    for s in schemes:
        row(f"ptq_{s}", lambda s=s: quantized(model, wd / f"ptq_{s}", s))
    if int8_compute:
        row("f32_int8_compute", lambda: {"ndcg@10": ndcg10(model, task, max_queries=max_queries,
                                                           quantized_compute="int8")})
    if train_config and qat_steps > 0:
        if control:
            row("f32_continued", lambda: {"ndcg@10": ndcg10(trained("f32_continued", ""), task,
                                                            max_queries=max_queries)})
        for s in schemes:
            row(f"qat_{s}", lambda s=s: quantized(trained(f"qat_{s}", s), wd / f"qat_{s}_export", None))
    (wd / "table.md").write_text(markdown(rows))
    return rows


def markdown(rows: dict[str, dict]) -> str:
    base = rows.get("f32", {}).get("ndcg@10")
    lines = ["| model | nDCG@10 | vs f32 | params on disk |", "|---|---|---|---|"]
    for name, r in rows.items():
        delta = f"{100 * (r['ndcg@10'] - base):+.1f} pt" if base is not None and name != "f32" else "-"
        size = f"{r['bytes_on_disk'] / 2 ** 20:.1f} MiB" if r.get("bytes_on_disk") else "-"
        lines.append(f"| {name} | {r['ndcg@10']:.3f} | {delta} | {size} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the f32 model (any saved model path)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--task", default=str(DEFAULT_TASK), help="a retrieval task directory")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--train-config", default="", help="CONFIG[:ARG] the QAT runs train with (none: PTQ only)")
    p.add_argument("--qat-steps", type=int, default=0)
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE for the QAT runs' config")
    p.add_argument("--no-control", action="store_true", help="skip the f32_continued row")
    p.add_argument("--int8-compute", action="store_true", help="add the f32 model's int8 encode row")
    p.add_argument("--max-queries", type=int, default=0, help="> 0: a seeded subsample of the queries")
    args = p.parse_args(argv)
    from embedder.cpu_tuning import tune_command

    tune_command(restart=False)
    rows = build_table(args.model, args.workdir, task=args.task, schemes=[s for s in args.schemes.split(",") if s],
                       block=args.block, train_config=args.train_config, qat_steps=args.qat_steps,
                       overrides=args.override, control=not args.no_control, int8_compute=args.int8_compute,
                       max_queries=args.max_queries)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
