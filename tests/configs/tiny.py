"""A tiny train experiment for loop/resume tests: `tests/configs/tiny.py:PAIRS.jsonl[.gz]`.

    python -m embedder.train --config tests/configs/tiny.py:/tmp/pairs.jsonl --workdir /tmp/run

The pairs file's folder also holds the prepared dataset (`tfds/`), so tests never
write into ~/tensorflow_datasets. A few steps of a 2-layer Gemma-style encoder.
"""

import pathlib

from embedder.train.config import base_config, model_config_dict


def get_config(arg: str = ""):
    if not arg:
        raise ValueError("tests/configs/tiny.py needs the pairs file: --config tests/configs/tiny.py:PAIRS.jsonl")
    pairs = pathlib.Path(arg)
    c = base_config()
    c.seed = 3
    c.batch_size = 16
    c.total_steps = 8
    c.log_every = 1
    c.mesh.shape = (-1, 1, 1)
    c.model = model_config_dict("tiny", projection_dims=(32,), mrl_dims=(32, 16))
    c.tokenizer.max_length = 32
    c.loss.temperature = 0.05
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 2
    c.optimizer.schedule = "cosine"
    c.data.datasets = [{"name": "pairs", "builder": "jsonl", "files": [str(pairs)], "task": "search result",
                        "weight": 1.0}]
    c.data.mode = "mixed"
    c.data.query_max_length = 16
    c.data.document_max_length = 32
    c.data.query_length_buckets = (16,)
    c.data.document_length_buckets = (32,)
    c.data.data_dir = str(pairs.parent / "tfds")
    c.data.prefetch = 2
    c.eval.tasks = ()
    c.eval.at_start = False
    c.checkpoint.every_steps = 2
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.export_params = True
    return c
