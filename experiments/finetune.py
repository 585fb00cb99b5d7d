r"""Fine-tune any saved model on your own JSONL pairs.

    python -m embedder.train --config experiments/finetune.py:MODEL \
        --config.data.datasets=pairs.jsonl[,more.jsonl] --workdir DIR [--config.x=v ...]

MODEL is anything the model store loads: a Hugging Face / sentence-transformers folder, a
GGUF file, a workdir, a checkpoint step, a parameter export or a soup. From it come the
architecture (`config.model`), the weights (`init_from`), the tokenizer (`tokenizer.file`
empty: the source's, copied into DIR) and the prompt templates (none when it has none:
raw text). The rest are flags with these defaults:

    model.projection_dims   the source's heads (none: mean pooling at the body's width);
                            e.g. --config.model.projection_dims=768 adds a fresh projection
    model.mrl_dims          the source's, else the width and its halvings down to 64 (at most 4)
    prompts.query / .document  the source's templates ("" = raw text)
    data.num_negatives      -1: as many hard negatives as the records carry (the run logs K)
    batch_size 32, total_steps 500, AdamW lr 5e-5, 50 warmup steps then linear decay,
    temperature 0.05, queries 64 and documents 256 tokens (at most the source's max length).

Each line of the data: {"query": ..., "positive": ..., "negatives": [...], "task": ..., "title": ...}
(`negatives`, `task`, `title` optional). The prepared data lives in DIR/data unless
--config.data.data_dir (or $TFDS_DATA_DIR) names another place. `--print_config` lists
every field with its value.
"""

import ml_collections

from embedder.model.config import ModelConfig
from embedder.model_store import load_spec, locate_model
from embedder.train.config import base_config

ConfigDict = ml_collections.ConfigDict


def default_mrl_dims(width: int, smallest: int = 64, most: int = 4) -> tuple[int, ...]:
    """`width` and its halvings down to `smallest`, at most `most` dims: 768 -> (768, 384, 192, 96)."""
    dims = [int(width)]
    while len(dims) < most and dims[-1] % 2 == 0 and dims[-1] // 2 >= smallest:
        dims.append(dims[-1] // 2)
    return tuple(dims)


def get_config(arg: str = ""):
    if not arg:
        raise ValueError("experiments/finetune.py needs the model to start from: "
                         "--config experiments/finetune.py:MODEL (a Hugging Face / sentence-transformers "
                         "folder, a .gguf file, a workdir or an export)")
    spec = load_spec(locate_model(arg))
    source_model = ModelConfig.from_dict(spec["model"])
    source_tok = dict(spec.get("tokenizer") or {})
    source_prompts = spec.get("prompts") or {}
    max_length = int(source_tok.get("max_length") or 512)

    c = base_config()
    c.init_from = arg
    # Tuples, not lists: absl config flags override tuple fields (--config.model.mrl_dims='(768,512)').
    c.model = ConfigDict({k: tuple(v) if isinstance(v, list) else v for k, v in source_model.to_dict().items()})
    if not source_model.mrl_dims:
        c.model.mrl_dims = default_mrl_dims(source_model.embedding_dim)
    # An empty file: the trainer takes the source's whole tokenizer entry (kind, special tokens).
    c.tokenizer = ConfigDict(dict(source_tok, file="", max_length=max_length))
    c.prompts = ConfigDict({"query": source_prompts.get("query") or "",
                            "document": source_prompts.get("document") or ""})

    c.batch_size = 32
    c.total_steps = 500
    c.log_every = 10
    c.loss.temperature = 0.05
    c.optimizer.learning_rate = 5e-5
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_steps = 50

    with c.data.ignore_type():   # a string: --config.data.datasets=FILE[,FILE...], one JSONL dataset
        c.data.datasets = ""
    c.data.mode = "mixed"
    c.data.num_negatives = -1
    c.data.query_max_length = min(64, max_length)
    c.data.document_max_length = min(256, max_length)
    c.eval.tasks = ()
    c.checkpoint.every_steps = 100
    return c
