"""sentence-transformers' own trainer on the same data and settings as `minilm_finetune.py`,
both models scored by our evaluator, with the wall-clock ratio.

    python experiments/minilm_finetune.py --section-steps 0 --workdir workdir/minilm   # ours, retrieval only
    python experiments/minilm_st_side_by_side.py --workdir workdir/minilm   # then this

Same mined triples (the first steps x batch of `mined.jsonl`), steps, batch, learning rate,
linear schedule with 10% warmup, AdamW (weight decay 0.01), clip 1.0, MatryoshkaLoss over
MultipleNegativesRankingLoss with scale 20 (= temperature 0.05), dims 384/256/128/64.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import minilm_finetune as ours  # noqa: E402


def train_st(mined: pathlib.Path, out: pathlib.Path, settings: dict, log) -> dict:
    """Trains all-MiniLM-L6-v2 with sentence-transformers' trainer; saves it to `out`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    s = settings
    n = s["steps"] * s["batch"]
    rows = [json.loads(line) for line in mined.read_text(encoding="utf-8").splitlines()[:n]]
    data = Dataset.from_dict({"anchor": [r["query"] for r in rows], "positive": [r["positive"] for r in rows],
                              "negative": [r["negatives"][0] for r in rows]})
    torch.manual_seed(s["seed"])
    model = SentenceTransformer(str(ours.minilm_path()), device="cpu")
    # One length for both sides, as ours (queries and documents cut at 128 tokens).
    model.max_seq_length = s["document_max_length"]
    loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=1.0 / s["temperature"]),
                          matryoshka_dims=list(ours.MRL_DIMS))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out.parent / "st_trainer"), max_steps=s["steps"], per_device_train_batch_size=s["batch"],
        learning_rate=s["lr"], warmup_steps=max(1, int(s["warmup_fraction"] * s["steps"])),
        lr_scheduler_type="linear", weight_decay=s["weight_decay"], max_grad_norm=s["grad_clip"],
        seed=s["seed"], batch_sampler=BatchSamplers.NO_DUPLICATES, logging_steps=10, save_strategy="no",
        report_to="none", use_cpu=True, dataloader_drop_last=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    t0, c0 = time.time(), time.process_time()
    trainer.train()
    timing = {"steps": s["steps"], "batch": s["batch"], "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    model.save(str(out))
    log.info("sentence-transformers trained %d steps in %.0fs", s["steps"], timing["wall_s"])
    return timing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, type=pathlib.Path, help="the minilm_finetune.py workdir")
    p.add_argument("--steps", type=int, default=ours.SETTINGS["steps"])
    p.add_argument("--batch", type=int, default=ours.SETTINGS["batch"])
    p.add_argument("--lr", type=float, default=ours.SETTINGS["lr"])
    p.add_argument("--tasks", default=",".join(pathlib.Path(t).name for t in ours.TASK_DIRS),
                   help="comma-separated task folders under data/debian/tasks to evaluate")
    args = p.parse_args(argv)
    tasks = tuple(str(ours.TASKS / t) for t in args.tasks.split(","))
    settings = dict(ours.SETTINGS, steps=args.steps, batch=args.batch, lr=args.lr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("minilm_st")
    wd = args.workdir.absolute()
    mined = wd / "mined.jsonl"
    if not mined.is_file():
        raise SystemExit(f"{mined} not found: run experiments/minilm_finetune.py --workdir {wd} first "
                         "(it mines the hard negatives both trainers use)")
    ours_run = json.loads((wd / "timing.json").read_text()).get("train", {}) if (wd / "timing.json").is_file() else {}
    if ours_run.get("section_steps", 0) or (wd / "section_rows.jsonl").is_file():
        raise SystemExit(f"{wd} trained on the retrieval + section mixture; the side-by-side compares the "
                         "trainers on retrieval triples alone (sentence-transformers' MNRL has no text-identity "
                         "mask, and its NO_DUPLICATES sampler cannot fill a batch of section labels): run "
                         f"experiments/minilm_finetune.py --section-steps 0 --workdir DIR with a fresh DIR first")
    timing_file = wd / "timing_st.json"
    st_dir = wd / "st_model"
    if not timing_file.is_file():
        timing_file.write_text(json.dumps(train_st(mined, st_dir, settings, log), indent=1))
    timing = json.loads(timing_file.read_text())
    # The ST folder loads through our from-hf path, so both are scored by the same evaluator.
    st_results = ours.evaluate(st_dir, wd / "eval_st.json", log, tasks)
    rows = {"all-MiniLM-L6-v2": ours.evaluate(ours.minilm_path(), wd / "eval_base.json", log, tasks)}
    ours_timing = {}
    if (wd / "eval_finetuned.json").is_file():
        rows["+ embedder fine-tune"] = json.loads((wd / "eval_finetuned.json").read_text())
        ours_timing = json.loads((wd / "timing.json").read_text()).get("train", {})
    if (wd / "eval_wise.json").is_file():
        rows["+ embedder fine-tune souped with base (WiSE-FT)"] = json.loads((wd / "eval_wise.json").read_text())
    rows["+ sentence-transformers fine-tune"] = st_results
    table = ours.write_table(rows, wd / "side_by_side.md", wd / "side_by_side.png")
    summary = {"sentence_transformers": timing, "embedder": ours_timing}
    if ours_timing:
        summary["wall_ratio_embedder_over_st"] = ours_timing["wall_s"] / timing["wall_s"]
        summary["cpu_ratio_embedder_over_st"] = ours_timing["cpu_s"] / timing["cpu_s"]
    (wd / "side_by_side.json").write_text(json.dumps(summary, indent=1))
    print(table)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
