"""The demo: a tiny from-scratch Gemma-style encoder, the two-stage recipe on the shipped Debian data.

`make demo` runs all of it (stage 1, hard-negative mining, stage 2, before/after
table, plots) through `python -m embedder.demo --workdir workdir/demo`. Each
stage is also a plain training run:

    python -m embedder.train --config experiments/demo.py:prefinetune --workdir workdir/demo/1_prefinetune
    python -m embedder.train --config experiments/demo.py:finetune@workdir/demo --workdir workdir/demo/2_finetune

`prefinetune`: (synopsis, description) pairs, no hard negatives, a large batch
through the gradient cache, mixed batches. `finetune@DEMO_DIR`: starts from
DEMO_DIR/1_prefinetune and trains on DEMO_DIR/mined_negatives.jsonl (the pairs
with the hard negatives the stage-1 model mined; `python -m embedder.demo`
writes it), task-homogeneous batches, a smaller learning rate. Plain
`finetune` (no `@DIR`) is the same stage from scratch without hard negatives.
"""

import pathlib

from embedder.train.config import base_config, model_config_dict

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = REPO / "data" / "debian" / "tasks"
MINED_FILE = "mined_negatives.jsonl"
STAGE1_DIR = "1_prefinetune"


def get_config(arg: str = "prefinetune"):
    stage, _, demo_dir = arg.partition("@")
    if stage not in ("prefinetune", "finetune") or (demo_dir and stage != "finetune"):
        raise ValueError(f"experiments/demo.py: unknown argument {arg!r}; use :prefinetune, :finetune "
                         "or :finetune@DEMO_DIR")
    c = base_config()
    c.seed = 0
    c.model = model_config_dict("small")
    c.tokenizer.file = "debian_sp8k.model"
    c.tokenizer.max_length = 128
    c.loss.temperature = 0.05

    c.data.datasets = [{"name": "debian_pairs", "builder": "debian", "task": "search result", "weight": 1.0}]
    c.data.query_max_length = 32
    c.data.document_max_length = 64
    c.data.query_length_buckets = (16, 32)
    c.data.document_length_buckets = (32, 64)

    c.eval.tasks = tuple(str(TASKS / t) for t in
                         ("debian_retrieval", "debian_section_classification", "debian_section_clustering"))
    c.eval.dims = (64, 16)
    c.eval.every_steps = 0
    c.checkpoint.every_steps = 50
    c.checkpoint.max_to_keep = 2

    if stage == "prefinetune":
        c.batch_size = 128
        c.grad_cache_chunks = 2
        c.total_steps = 160
        c.data.mode = "mixed"
        c.data.num_negatives = 0
        c.optimizer.learning_rate = 2e-3
        c.optimizer.warmup_steps = 15
    else:
        c.batch_size = 64
        c.grad_cache_chunks = 0
        c.total_steps = 120
        c.data.mode = "homogeneous"
        c.optimizer.learning_rate = 5e-4
        c.optimizer.warmup_steps = 10
        c.eval.at_start = False
        c.data.num_negatives = 0
        if demo_dir:
            demo = pathlib.Path(demo_dir).expanduser()
            c.init_from = str(demo / STAGE1_DIR)
            c.data.num_negatives = 1
            c.data.datasets = [{"name": "debian_pairs", "builder": "jsonl", "files": [str(demo / MINED_FILE)],
                                "task": "search result", "weight": 1.0}]
    return c
