"""Test setup: CPU JAX with 8 fake devices, set before JAX is imported."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import embedder  # noqa: E402

embedder.tune_cpu()   # the tests run with the tuning the project's commands apply

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "debian"


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def debian_dir():
    return DATA


def load_script(path: pathlib.Path):
    """A script that is not a package module (an experiment driver, a data builder) as a module."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_debian_pairs(path: pathlib.Path, n: int) -> pathlib.Path:
    """The first `n` shipped Debian training pairs as a `{query, positive}` JSONL file."""
    import gzip
    import itertools
    import json

    with gzip.open(DATA / "train_pairs.jsonl.gz", "rt", encoding="utf-8") as f, \
            open(path, "w", encoding="utf-8") as out:
        for line in itertools.islice(f, n):
            r = json.loads(line)
            out.write(json.dumps({"query": r["query"], "positive": r["positive"]}) + "\n")
    return path
