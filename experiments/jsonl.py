r"""Train the small from-scratch encoder of the demo (2 layers, the shipped Debian SentencePiece
tokenizer) on any JSONL file(s) of records. To fine-tune a pretrained model on your data, use
experiments/finetune.py instead.

    python -m embedder.train --config experiments/jsonl.py:PATH[,PATH...] --workdir DIR \
        [--config.total_steps=1000 --config.batch_size=128 ...]

Each line: {"query": ..., "positive": ..., "negatives": [...], "task": ..., "title": ...}
(`negatives`, `task`, `title` optional). Bad records stop the run with
`FILE:LINE: what is wrong (how to fix)`; `--config.data.on_bad_record=skip`
skips and counts them instead. Every hard negative the records carry is used
(`data.num_negatives=-1`, the run logs how many; `--config.data.num_negatives=K` takes K).
"""

import pathlib

from embedder.train.config import base_config, model_config_dict


def get_config(arg: str = ""):
    if not arg:
        raise ValueError("experiments/jsonl.py needs the data file(s): --config experiments/jsonl.py:PATH[,PATH...]")
    files = [str(pathlib.Path(p).expanduser()) for p in arg.split(",") if p]
    c = base_config()
    c.model = model_config_dict("small")
    c.batch_size = 64
    c.total_steps = 200
    c.data.datasets = [{"name": pathlib.Path(files[0]).name.split(".")[0] or "data", "builder": "jsonl",
                        "files": files, "task": "search result", "weight": 1.0}]
    c.data.query_max_length = 64
    c.data.document_max_length = 128
    c.data.num_negatives = -1   # as many as the records carry
    c.eval.tasks = ()
    return c
