"""Gradient cache: chunk layout keeps rows on their devices; gradients equal the full-batch ones."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder import sharding
from embedder.train.grad_cache import merge_chunks, split_chunks
from embedder.train.step import make_grad_fn
from test_train_step import OPT, StandInEncoder, make_batch, mesh_of, run_steps

LOSS = {"dims": (16, 8, 4), "temperature": 0.05, "global_hard_negatives": True, "hardness_alpha": 5.0,
        "spread_out_weight": 0.1}


def test_chunks_keep_rows_on_their_devices_and_merge_back():
    mesh = mesh_of((4, 2, 1))
    rows = 32
    x = jax.device_put(np.arange(rows * 3).reshape(rows, 3), sharding.batch_sharding(mesh, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        chunked = jax.jit(lambda a: split_chunks(a, 4))(x)
        merged = jax.jit(lambda a: merge_chunks(split_chunks(a, 4)))(x)
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(x))
    # chunk c holds rows c, c + 4, ...
    np.testing.assert_array_equal(np.asarray(chunked)[1, :, 0], np.arange(1, rows, 4) * 3)
    # Each device's piece of every chunk comes from the rows that device already held.
    owned = {shard.device: set(np.asarray(shard.data)[:, 0] // 3) for shard in x.addressable_shards}
    for shard in chunked.addressable_shards:
        got = set(np.asarray(shard.data)[..., 0].ravel() // 3)
        assert got <= owned[shard.device], (shard.device, got, owned[shard.device])
    with pytest.raises(ValueError, match="grad_cache_chunks"):
        split_chunks(jnp.zeros((10, 2)), 4)


def _grads(mesh, batch, chunks):
    model = StandInEncoder()
    params = jax.jit(lambda k: model.init(k, batch["query_ids"][:1], batch["query_mask"][:1])["params"])(
        jax.random.key(0))
    params = nn.meta.unbox(params)
    grad_fn = make_grad_fn(model, LOSS, grad_cache_chunks=chunks)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        (loss, metrics), grads = jax.jit(grad_fn)(params, sharding.host_to_global(batch, mesh), jax.random.key(3))
    return float(loss), {k: float(v) for k, v in metrics.items()}, jax.tree.map(np.asarray, grads)


def test_cached_gradients_equal_full_batch_sharded():
    mesh = mesh_of((2, 2, 2))
    batch = make_batch(7, b=32, k=3)
    loss, metrics, grads = _grads(mesh, batch, 0)
    c_loss, c_metrics, c_grads = _grads(mesh, batch, 4)
    assert c_loss == pytest.approx(loss, rel=1e-6)
    for key in metrics:
        assert c_metrics[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
    assert scale > 1e-3, "gradients vanish: the comparison would be vacuous"
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        cg = c_grads
        for key in path:
            cg = cg[key.key]
        np.testing.assert_allclose(cg, g, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_cached_train_steps_equal_uncached_steps():
    batches = [make_batch(s, b=16) for s in (11, 12)]
    opt = dict(OPT, warmup_steps=0)
    losses, params, _, _ = run_steps(StandInEncoder(), mesh_of((4, 2, 1)), batches, loss=LOSS, opt=opt)
    c_losses, c_params, _, _ = run_steps(StandInEncoder(), mesh_of((4, 2, 1)), batches, loss=LOSS, opt=opt,
                                         chunks=2)
    np.testing.assert_allclose(c_losses, losses, rtol=1e-5)
    # Adam divides each update by the root of its second moment, so float rounding in a near-zero
    # gradient moves that element by a small fraction of the learning rate; a wrong gradient
    # moves elements by the order of the learning rate itself.
    atol = 1e-3 * opt["learning_rate"]
    for a, b in zip(jax.tree.leaves(c_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
