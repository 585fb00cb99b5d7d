"""`data.packing` end to end: a tiny packed training run, packing with the gradient cache,
the packed compile-only shapes, and token counts of packed and padded batches."""
import importlib.util
import json
import math

import numpy as np
import pytest

from conftest import write_debian_pairs
from embedder.data.abstract_batch import global_batch_shapes
from embedder.data.batch_schema import sequence_shapes, token_counts
from embedder.data.packing import pack_batch
from embedder.train import compile_only as co
from embedder.train import loop


def _tiny_config(pairs, repo_root, **changes):
    """tests/configs/tiny.py (16 rows, queries <= 16 and documents <= 32 tokens) with `a__b=value` changes."""
    spec = importlib.util.spec_from_file_location("tiny_config", repo_root / "tests" / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(str(pairs))
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in changes.items()})
    return c


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """100 shipped Debian pairs as JSONL; the prepared dataset lives beside it."""
    return write_debian_pairs(tmp_path_factory.mktemp("packed") / "pairs.jsonl", 100)


def test_packed_run_trains_and_logs_finite_losses(pairs, repo_root, tmp_path, caplog):
    caplog.set_level("INFO", logger="embedder.train")
    config = _tiny_config(pairs, repo_root, data__packing=True, total_steps=3, checkpoint__every_steps=3,
                          checkpoint__export_params=False)
    result = loop.train(config, tmp_path / "run")
    assert result["step"] == 3 and not result["preempted"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]), r
        assert r["train/tokens_per_sec"] > 0 and 0 <= r["train/padding_fraction"] < 0.5, r
    assert "compiled step for packed_ids[" in caplog.text


def test_packing_with_the_gradient_cache_compiles_with_rows_for_every_chunk(pairs, repo_root):
    config = _tiny_config(pairs, repo_root, data__packing=True, grad_cache_chunks=2)
    loop.check_config(config)
    report = co.compile_train_step(config)   # 8 local CPU devices x 2 chunks: rows a multiple of 16
    assert report.fits and not report.error
    assert global_batch_shapes(config, row_multiple=16)["packed_ids"].shape[0] % 16 == 0


def test_compile_only_shapes_of_packed_batches(pairs, repo_root):
    config = _tiny_config(pairs, repo_root, data__packing=True, data__num_negatives=1)
    shapes = global_batch_shapes(config, row_multiple=8)
    # 16 queries of 16 tokens (two a row) + 32 documents of 32 tokens: 40 rows of 32.
    assert shapes["packed_ids"].shape == shapes["packed_positions"].shape == (40, 32)
    assert "query_ids" not in shapes and "negative_mask" not in shapes
    assert shapes["negatives_valid"].shape == (16, 1) and shapes["negative_hash"].shape == (16, 1, 2)
    assert sequence_shapes(shapes) == [(40, 32)]
    report = co.compile_train_step(config)   # the 8 local CPU devices: rows a multiple of 8
    assert report.fits and not report.error and report.flops["tokens"] == 40 * 32


def test_token_counts_of_padded_and_packed_batches():
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.int32)
    batch = {"query_ids": np.full((2, 4), 5, np.int32), "query_mask": mask,
             "positive_ids": np.full((2, 4), 6, np.int32), "positive_mask": np.ones((2, 4), np.int32),
             "dataset": np.zeros(2, np.int32)}
    assert token_counts(batch) == (11, 16)
    packed = pack_batch(batch, pad_id=0, row_multiple=4)
    assert token_counts(packed) == (11, packed["packed_ids"].size) == (11, 16)
