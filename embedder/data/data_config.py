"""The training data config: `default_data_config()` and the checks on its fields.

`data_config` (an `ml_collections.ConfigDict`; start from `default_data_config()`):

    datasets            list of dicts, one per mixture component (or a string "a.jsonl[,b.jsonl...]":
                        one JSONL dataset of those files, named after the first, default task):
                          name     str, unique; shows up in metrics and in `batch["dataset"]` order
                          builder  "jsonl" (default when `files` is set) | "beir" | "debian"
                          files    list of .jsonl / .jsonl.gz paths            (jsonl)
                          path     BEIR folder (corpus, queries, qrels/)       (beir)
                                   or the Debian train_pairs file              (debian, optional)
                          split    qrels split for BEIR, default "train"
                          task     task string for the query prompt, default "search result";
                                   a record's own "task" field wins
                          weight   mixture weight (>= 0), default 1.0
                          distill  false: with data.teacher, this dataset's rows are not
                                   distilled (no signals needed for its texts; teacher_valid 0),
                                   e.g. translated pairs under an English-only teacher; default true
    mode                "homogeneous": each global batch from one dataset, drawn by weight
                        (fine-tuning); "mixed": rows from all datasets in one batch (pre-finetuning)
    query_max_length    tokens per query, prompt and special tokens included (the text is cut)
    document_max_length tokens per positive / negative
    query_length_buckets, document_length_buckets
                        padded lengths; a batch side is padded to the smallest bucket that fits,
                        so the step compiles at most len(q) * len(d) times. Empty -> powers of two
                        from max_length / 8 up to max_length. Positives and negatives share a bucket.
    num_negatives       K hard negatives per row; rows with fewer get `negatives_valid=False` slots
                        (a record with more keeps a seeded random K); -1: as many as the records
                        carry (the most any record of the mixture has, counted when the data is
                        prepared; the run logs the K it took)
    on_bad_record       "strict": stop before training with `FILE:LINE: problem (fix)`;
                        "skip": skip bad records, count them per reason (`iterator.skip_counts`)
    max_text_chars      a longer query / positive / negative / title is a bad record
    data_dir            where prepared array_record datasets live; "" -> $TFDS_DATA_DIR when set,
                        else WORKDIR/data under `python -m embedder.train` (the run logs the directory)
    shuffle             visit each dataset in a seeded random order, reshuffled every epoch
    prefetch            batches built ahead on a background thread (0 = build on demand)
    packing             emit packed batches (`embedder.data.packing.pack_batch`): each padded batch's
                        queries, positives and negatives packed into rows of document_max_length
                        tokens (query_max_length if longer; ARCHITECTURE.md "Batches"), so the
                        encoder spends little on padding.
                        The row count varies between batches (rounded up by `packed_rows`, at most
                        1/16 over; with several processes every host takes the row count
                        of the fullest host's slice), so the step compiles for a few more shapes.
                        With grad_cache_chunks > 1 the chunks split the packed rows.
    teacher             a teacher's signals directory (`python -m embedder.distill teacher`), joined to
                        every row by its texts' keys (`embedder.distill.signals`): adds teacher_query,
                        teacher_positive, teacher_negative and/or teacher_scores, and teacher_valid
                        (which rows they cover: a dataset's "distill": false leaves its rows out), to
                        each batch for the loss.distill_* options; "" (default): no teacher
"""
from __future__ import annotations

import collections
import pathlib

import ml_collections

from embedder.data.prompts import DEFAULT_TASK
from embedder.data.tokenizer import length_buckets


def default_data_config() -> ml_collections.ConfigDict:
    """The shipped Debian pairs, retrieval prompts, no hard negatives, strict validation."""
    c = ml_collections.ConfigDict()
    c.datasets = [{"name": "debian", "builder": "debian", "task": DEFAULT_TASK, "weight": 1.0}]
    c.mode = "homogeneous"
    c.query_max_length = 64
    c.document_max_length = 256
    c.query_length_buckets = ()
    c.document_length_buckets = ()
    c.num_negatives = 0
    c.on_bad_record = "strict"
    c.max_text_chars = 100_000
    c.data_dir = ""
    c.shuffle = True
    c.prefetch = 2
    c.packing = False
    c.teacher = ""
    return c


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Doublings of max_length / 8 (at least 8) up to max_length, which is always last."""
    return length_buckets(max_length, smallest=max(8, max_length // 8))


def checked_buckets(given, max_length: int, name: str) -> tuple[int, ...]:
    """The sorted buckets of `data_config.NAME` (`default_buckets` when empty), checked."""
    if not given:
        return default_buckets(max_length)
    buckets = tuple(sorted(int(b) for b in given))
    if buckets[0] <= 0 or buckets[-1] != max_length:
        raise ValueError(f"data_config.{name}={list(given)}: buckets must be positive and the largest "
                         f"must equal the max length {max_length} (add {max_length})")
    return buckets


def jsonl_files_entry(files: str) -> dict:
    """The dataset entry of a `data.datasets` string: comma-separated JSONL files, one dataset."""
    paths = [f.strip() for f in files.split(",") if f.strip()]
    name = pathlib.Path(paths[0]).name.split(".")[0] if paths else ""
    return {"name": name or "data", "builder": "jsonl", "files": paths, "task": DEFAULT_TASK, "weight": 1.0}


def is_distilled(entry: dict) -> bool:
    """Whether a dataset entry's rows are distilled when data.teacher is set (its "distill", default true)."""
    value = entry.get("distill", True)
    if not isinstance(value, bool):
        raise ValueError(f"data_config.datasets entry {entry.get('name')!r}: \"distill\": {value!r} must be "
                         "true or false")
    return value


def dataset_entries(data_config) -> list[dict]:
    """`data_config.datasets` as dicts with defaults filled in; names must be unique. A string
    names JSONL files of one dataset (`jsonl_files_entry`)."""
    datasets = data_config.datasets
    if isinstance(datasets, str):
        if not datasets.strip():
            raise ValueError("data_config.datasets is empty; pass your JSONL file(s), e.g. "
                             "--config.data.datasets=pairs.jsonl (comma-separated for several)")
        datasets = [jsonl_files_entry(datasets)]
    entries = [dict(e) for e in (datasets or [])]
    if not entries:
        raise ValueError("data_config.datasets is empty; add at least one {name, files|builder, task, weight}")
    names = [e.get("name") for e in entries]
    for i, e in enumerate(entries):
        if not e.get("name"):
            raise ValueError(f"data_config.datasets[{i}] has no 'name'; give every dataset a unique name")
        e.setdefault("weight", 1.0)
        e.setdefault("task", DEFAULT_TASK)
    dupes = [n for n, c in collections.Counter(names).items() if c > 1]
    if dupes:
        raise ValueError(f"data_config.datasets names must be unique; repeated: {dupes}")
    return entries
