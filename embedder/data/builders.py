"""TFDS builders (array_record, no TensorFlow) for training pairs: JSONL files, BEIR folders, Debian.

`prepare_dataset(entry, ...)` validates and writes a dataset once under `data_dir`,
then returns a random-access source of decoded records plus its bad-record counts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from embedder.data.records import BadRecordError, BadRecordLog, read_beir_pairs, read_jsonl_pairs



@contextlib.contextmanager
def _quiet_tfds():
    # TFDS warns "Using custom data configuration" for every config it did not declare,
    # which is every dataset here; keep real errors.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)

DEBIAN_PAIRS = pathlib.Path(__file__).resolve().parents[2] / "data" / "debian" / "train_pairs.jsonl.gz"
BAD_RECORDS_FILE = "bad_records.json"
BUILDERS = ("jsonl", "beir", "debian")


@dataclasses.dataclass
class PairsConfig(tfds.core.BuilderConfig):
    files: tuple = ()
    path: str = ""
    split: str = "train"
    max_text_chars: int = 100_000
    on_bad_record: str = "strict"


def _pair_features():
    return tfds.features.FeaturesDict({
        "query": tfds.features.Text(),
        "positive": tfds.features.Text(),
        "negatives": tfds.features.Sequence(tfds.features.Text()),
        "task": tfds.features.Text(),
        "title": tfds.features.Text(),
    })


class _PairsBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared body: validation happens while generating; skip counts land next to the data."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=_pair_features(),
                                     description=self.__class__.__doc__)

    def _split_generators(self, dl_manager):
        del dl_manager
        self._bad = BadRecordLog(self.builder_config.on_bad_record)
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        count = 0
        self._max_negatives = 0
        for key, record in self._records(self._bad):
            count += 1
            self._max_negatives = max(self._max_negatives, len(record.get("negatives") or ()))
            yield key, record
        if count == 0:
            raise BadRecordError(f"{self._source_name()}: no valid records "
                                 f"({self._bad.summary()}); fix the data or drop the dataset", "no_records")

    def _download_and_prepare(self, dl_manager, download_config=None):
        result = super()._download_and_prepare(dl_manager, download_config)
        # Written into the incomplete dir, so it moves with the data when preparation succeeds.
        payload = {"counts": dict(self._bad.counts), "examples": self._bad.examples, "first": self._bad.first,
                   "max_negatives": self._max_negatives}
        pathlib.Path(self.data_path, BAD_RECORDS_FILE).write_text(json.dumps(payload, indent=1))
        return result


class EmbedderJsonlPairs(_PairsBuilder):
    """Training pairs from JSONL(.gz) files: {query, positive, negatives?, task?, title?}."""

    def _records(self, bad):
        return read_jsonl_pairs(self.builder_config.files, bad, self.builder_config.max_text_chars)

    def _source_name(self):
        return ", ".join(self.builder_config.files)


class EmbedderBeirPairs(_PairsBuilder):
    """Training pairs from a BEIR folder: qrels score > 0 are positives, <= 0 hard negatives."""

    def _records(self, bad):
        return read_beir_pairs(self.builder_config.path, self.builder_config.split, bad,
                               self.builder_config.max_text_chars)

    def _source_name(self):
        return f"{self.builder_config.path} (split {self.builder_config.split})"


class EmbedderDebianPairs(EmbedderJsonlPairs):
    """The shipped Debian pairs (synopsis -> long description), data/debian/train_pairs.jsonl.gz."""


def _fingerprint(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def _file_state(path: pathlib.Path):
    # Re-prepare when a file changes: path, size and mtime identify its content cheaply.
    try:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(path), "missing")


def _beir_state(path: pathlib.Path, split: str):
    names = ["corpus.jsonl", "corpus.jsonl.gz", "queries.jsonl", "queries.jsonl.gz", f"qrels/{split}.tsv"]
    return [_file_state(path / n) for n in names if (path / n).exists()] or [(str(path), "missing")]


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def make_builder(entry: dict, *, data_dir, on_bad_record="strict", max_text_chars=100_000):
    """The TFDS builder for one `data_config.datasets` entry (not prepared yet)."""
    name = entry.get("name") or "dataset"
    kind = entry.get("builder") or ("jsonl" if entry.get("files") else None)
    common = dict(max_text_chars=int(max_text_chars), on_bad_record=on_bad_record)
    if kind == "jsonl":
        files = entry.get("files")
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        if not files:
            raise ValueError(f"dataset {name!r}: builder 'jsonl' needs 'files' (a list of .jsonl/.jsonl.gz paths)")
        files = tuple(str(pathlib.Path(os.path.expanduser(str(f))).absolute()) for f in files)
        fp = _fingerprint([_file_state(pathlib.Path(f)) for f in files], max_text_chars)
        cls, config = EmbedderJsonlPairs, PairsConfig(name=f"{_slug(name)}-{fp}", files=files, **common)
    elif kind == "beir":
        if not entry.get("path"):
            raise ValueError(f"dataset {name!r}: builder 'beir' needs 'path' (a folder with corpus, queries, qrels/)")
        path = pathlib.Path(os.path.expanduser(entry["path"])).absolute()
        split = entry.get("split") or "train"
        fp = _fingerprint(_beir_state(path, split), split, max_text_chars)
        cls, config = EmbedderBeirPairs, PairsConfig(name=f"{_slug(name)}-{fp}", path=str(path), split=split,
                                                    **common)
    elif kind == "debian":
        path = pathlib.Path(entry.get("path") or DEBIAN_PAIRS)
        if path.is_dir():
            path = path / "train_pairs.jsonl.gz"
        if not path.exists():
            raise FileNotFoundError(f"dataset {name!r}: Debian pairs not found at {path}; set the entry's "
                                    "'path' to data/debian/train_pairs.jsonl.gz of an embedder checkout")
        fp = _fingerprint(_file_state(path), max_text_chars)
        cls, config = EmbedderDebianPairs, PairsConfig(name=f"debian-{fp}", files=(str(path.absolute()),),
                                                      **common)
    else:
        raise ValueError(f"dataset {name!r}: unknown builder {kind!r}; use one of {BUILDERS} "
                         "(or give 'files' for JSONL)")
    with _quiet_tfds():
        return cls(config=config, data_dir=str(data_dir), file_format="array_record")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())[:40] or "dataset"


class PairSource:
    """Random access to decoded records (`str` fields) of a prepared array_record split."""

    def __init__(self, data_source):
        self._src = data_source

    def __len__(self):
        return len(self._src)

    def __getitem__(self, index) -> dict:
        return _decode(self._src[int(index)])

    def __getitems__(self, indices) -> list[dict]:
        return [_decode(r) for r in self._src.__getitems__([int(i) for i in indices])]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _decode(r: dict) -> dict:
    return {"query": _text(r["query"]), "positive": _text(r["positive"]),
            "negatives": [_text(n) for n in r["negatives"]], "task": _text(r["task"]),
            "title": _text(r["title"])}


@dataclasses.dataclass
class PreparedDataset:
    name: str
    source: PairSource
    skip_counts: dict
    skip_examples: dict
    directory: str
    max_negatives: int   # the most negatives any record has



def prepare_dataset(entry: dict, *, data_dir=None, on_bad_record="strict", max_text_chars=100_000,
                    quiet=True) -> PreparedDataset:
    """Validates and writes one dataset (once; later calls reuse it) and opens it for reading.

    Under `strict`, a bad record stops here with `BadRecordError` (`FILE:LINE: problem (fix)`),
    also when the data was prepared earlier under `skip` and had skipped records.
    """
    data_dir = data_dir or default_data_dir()
    builder = make_builder(entry, data_dir=data_dir, on_bad_record=on_bad_record,
                           max_text_chars=max_text_chars)
    if quiet:
        tfds.disable_progress_bar()
    builder.download_and_prepare()
    sidecar = pathlib.Path(builder.data_dir, BAD_RECORDS_FILE)
    bad = json.loads(sidecar.read_text()) if sidecar.exists() else {"counts": {}, "examples": {}}
    if on_bad_record == "strict" and bad["counts"]:
        reason, line = bad.get("first") or sorted(bad["examples"].items())[0]
        raise BadRecordError(line, reason)
    source = PairSource(builder.as_data_source()["train"])
    max_negatives = bad.get("max_negatives")
    if max_negatives is None:   # prepared before the count was recorded: count once now
        max_negatives = max((len(r["negatives"]) for r in _all_records(source)), default=0)
    return PreparedDataset(name=entry.get("name") or builder.builder_config.name, source=source,
                           skip_counts=dict(bad["counts"]), skip_examples=dict(bad["examples"]),
                           directory=str(builder.data_dir), max_negatives=int(max_negatives))


def _all_records(source: PairSource, chunk: int = 4096):
    for lo in range(0, len(source), chunk):
        yield from source.__getitems__(range(lo, min(lo + chunk, len(source))))
