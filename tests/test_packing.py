"""Sequence packing: the row assignment against brute-force checks, and packed encoder calls
against the padded ones on the same sequences (both families, local windows, scanned layers,
gradients)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder.data.packing import assign_rows, pack_sequences, packed_rows
from embedder.data.tokenizer import pad_batch
from embedder.model import EmbeddingModel, get_model_config


def _random_seqs(rng, n, max_len, vocab=8000, empty=True):
    lengths = rng.integers(0 if empty else 1, max_len + 1, size=n)
    return [list(rng.integers(3, vocab, size=k)) for k in lengths]


@pytest.mark.parametrize("seed", range(5))
def test_assign_rows_places_every_sequence_without_overlap(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 17, size=200)
    row, start = assign_rows(lengths, 16)
    used = {}
    for i, (r, b, n) in enumerate(zip(row, start, lengths)):
        assert 0 <= b and b + n <= 16
        for t in range(b, b + n):
            assert (r, t) not in used, f"sequences {used[(r, t)]} and {i} overlap"
            used[(r, t)] = i
    # Best-fit decreasing needs at most 11/9 OPT + 1 rows; OPT >= ceil(total / 16).
    needed = int(row[lengths > 0].max()) + 1
    assert needed <= 11 / 9 * -(-lengths.sum() // 16) + 1


def test_pack_sequences_round_trips_and_is_deterministic():
    rng = np.random.default_rng(0)
    seqs = _random_seqs(rng, 50, 12)
    packed = pack_sequences(seqs, 12, pad_id=0, row_multiple=4)
    again = pack_sequences(seqs, 12, pad_id=0, row_multiple=4)
    assert all(np.array_equal(packed[k], again[k]) for k in packed)
    rows, length = packed["ids"].shape
    assert length == 12 and rows % 4 == 0
    for i, s in enumerate(seqs):
        where = packed["sequence_ids"] == i
        assert where.sum() == len(s)
        assert packed["ids"][where].tolist() == s  # row-major order keeps each sequence in order
        assert packed["positions"][where].tolist() == list(range(len(s)))
    assert (packed["ids"][packed["sequence_ids"] < 0] == 0).all()


def test_packing_errors_name_the_fix():
    with pytest.raises(ValueError, match="sequence 1 has 5 tokens > row length 4"):
        pack_sequences([[1], [1, 2, 3, 4, 5]], 4, 0)
    with pytest.raises(ValueError, match="need 2 rows of 4; rows=1"):
        pack_sequences([[1, 2, 3], [1, 2, 3]], 4, 0, rows=1)


def test_packed_rows_rounds_up_by_at_most_a_sixteenth():
    for needed in range(1, 3000):
        rows = packed_rows(needed, row_multiple=8)
        assert rows >= needed and rows % 8 == 0
        assert rows <= max(needed * 17 / 16, needed + 8) + 1e-9
    assert packed_rows(131) == 136 and packed_rows(1000) == 1024


def _padded_and_packed(model, params, seqs, row_length, deterministic=True, rngs=None):
    ids, mask = pad_batch(seqs, 0)
    padded = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                         deterministic=deterministic, rngs=rngs)
    p = pack_sequences(seqs, row_length, 0, row_multiple=1)
    packed = model.apply({"params": params}, jnp.asarray(p["ids"]), None, sequence_ids=jnp.asarray(p["sequence_ids"]),
                         positions=jnp.asarray(p["positions"]), num_sequences=len(seqs),
                         deterministic=deterministic, rngs=rngs)
    return np.asarray(padded), np.asarray(packed), p


@pytest.mark.parametrize("name,overrides", [
    ("tiny-bert", {}),
    ("tiny", {}),                                   # gemma: RoPE, local window 4 + global
    ("tiny", {"scan_layers": True}),                # mixed local/global under nn.scan
    ("tiny", {"sliding_window": 2, "layer_types": ("local", "local")}),
])
def test_packed_embeddings_equal_padded(name, overrides):
    cfg = dataclasses.replace(get_model_config(name), **overrides)
    model = EmbeddingModel(cfg)
    rng = np.random.default_rng(1)
    seqs = _random_seqs(rng, 13, 10, vocab=cfg.vocab_size, empty=False)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
    padded, packed, p = _padded_and_packed(model, params, seqs, row_length=24)
    assert p["ids"].shape[0] < len(seqs)  # several sequences did share rows
    np.testing.assert_allclose(packed, padded, atol=2e-6, rtol=1e-5)


def test_packed_gradients_equal_padded():
    cfg = get_model_config("tiny-bert")
    model = EmbeddingModel(cfg)
    rng = np.random.default_rng(2)
    seqs = _random_seqs(rng, 9, 12, vocab=cfg.vocab_size, empty=False)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
    ids, mask = pad_batch(seqs, 0)
    p = pack_sequences(seqs, 16, 0, row_multiple=1)
    weights = jnp.asarray(rng.normal(size=(len(seqs), cfg.hidden_size)), jnp.float32)

    def padded_loss(prm):
        return jnp.sum(model.apply({"params": prm}, jnp.asarray(ids), jnp.asarray(mask)) * weights)

    def packed_loss(prm):
        emb = model.apply({"params": prm}, jnp.asarray(p["ids"]), None,
                          sequence_ids=jnp.asarray(p["sequence_ids"]), positions=jnp.asarray(p["positions"]),
                          num_sequences=len(seqs))
        return jnp.sum(emb * weights)

    g_pad, g_pack = jax.grad(padded_loss)(params), jax.grad(packed_loss)(params)
    flat_pad, flat_pack = jax.tree.leaves_with_path(g_pad), jax.tree.leaves(g_pack)
    for (path, a), b in zip(flat_pad, flat_pack):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_empty_sequence_pools_to_zeros_like_an_all_padding_row():
    cfg = get_model_config("tiny-bert")
    model = EmbeddingModel(cfg)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
    p = pack_sequences([[5, 6, 7], []], 8, 0, row_multiple=1)
    emb = model.apply({"params": params}, jnp.asarray(p["ids"]), None, sequence_ids=jnp.asarray(p["sequence_ids"]),
                      positions=jnp.asarray(p["positions"]), num_sequences=2)
    assert np.all(np.asarray(emb[1]) == 0) and np.any(np.asarray(emb[0]) != 0)


def test_packed_call_checks_its_inputs():
    cfg = get_model_config("tiny-bert")
    model = EmbeddingModel(cfg)
    ids = jnp.ones((2, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids, ids)["params"]
    with pytest.raises(ValueError, match="positions and num_sequences"):
        model.apply({"params": params}, ids, None, sequence_ids=ids)
    with pytest.raises(ValueError, match="must all be"):
        model.apply({"params": params}, ids, None, sequence_ids=ids, positions=jnp.ones((2, 5), jnp.int32),
                    num_sequences=2)
