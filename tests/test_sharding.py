"""Mesh construction, logical rules and host->global placement on 8 fake CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder import sharding as S


def test_mesh_autofill_and_errors():
    mesh = S.make_mesh({"axes": ("data", "fsdp", "tensor"), "shape": (-1, 2, 2)})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert S.data_parallel_size(mesh) == 4
    with pytest.raises(S.ShardingError, match="does not divide the 8"):
        S.make_mesh({"axes": ("data", "fsdp"), "shape": (3, -1)})
    with pytest.raises(S.ShardingError, match="needs 4 devices but 8"):
        S.make_mesh({"axes": ("data", "fsdp"), "shape": (2, 2)})
    with pytest.raises(S.ShardingError, match="not a tuple of integers"):
        S.make_mesh({"axes": ("data", "fsdp"), "shape": ("4", "x")})
    with pytest.raises(S.ShardingError, match="more than one -1"):
        S.make_mesh({"axes": ("data", "fsdp"), "shape": (-1, -1)})


class _Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        emb = self.param("emb", nn.with_logical_partitioning(nn.initializers.normal(), ("vocab", "embed")),
                         (64, 16))
        kv = self.param("kv", nn.with_logical_partitioning(nn.initializers.normal(),
                                                           ("embed", "kv_heads", "head_dim")), (16, 1, 8))
        h = nn.with_logical_constraint(emb[x], ("batch", "length", "embed"))
        return jnp.einsum("ble,ekd->bkd", h, kv).mean(1)


def test_param_shardings_fit_and_born_sharded():
    mesh = S.make_mesh({"axes": ("data", "fsdp", "tensor"), "shape": (2, 2, 2)})
    model = _Toy()
    x = np.arange(40, dtype=np.int32).reshape(8, 5) % 64
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    shardings = S.param_shardings(abstract, mesh)
    assert shardings["emb"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    # a single kv head cannot be split over tensor=2: that dim is replicated, not an error
    assert shardings["kv"].spec == jax.sharding.PartitionSpec("fsdp", None, None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(S.DEFAULT_RULES):
        params = jax.jit(lambda k: nn.meta.unbox(model.init(k, x)["params"]), out_shardings=shardings)(
            jax.random.key(0))
        batch = S.host_to_global({"x": x}, mesh)
        y = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch["x"])
    ref = model.apply({"params": jax.device_get(params)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-6)
    assert params["emb"].sharding.spec == shardings["emb"].spec


def test_insufficiently_sharded_is_reported():
    mesh = S.make_mesh({"axes": ("data", "fsdp"), "shape": (2, 4)})
    params = {"w": jnp.zeros((1024, 1024))}
    shardings = {"w": S.replicated(mesh)}
    assert S.check_sufficiently_sharded(params, shardings, mesh, min_size=1000)
    with pytest.raises(S.ShardingError, match="replicated"):
        S.check_sufficiently_sharded(params, shardings, mesh, min_size=1000, raise_error=True)


def test_host_to_global_rejects_indivisible_batch():
    mesh = S.make_mesh({"axes": ("data",), "shape": (8,)})
    with pytest.raises(S.ShardingError, match="multiple of 8"):
        S.host_to_global({"query_ids": np.zeros((6, 4), np.int32)}, mesh)


def test_rules_naming_axes_absent_from_the_mesh():
    mesh = S.make_mesh({"axes": ("data",), "shape": (8,)})
    abstract = jax.eval_shape(_Toy().init, jax.random.key(0), np.zeros((8, 5), np.int32))["params"]
    shardings = S.param_shardings(abstract, mesh)
    assert shardings["emb"].spec == jax.sharding.PartitionSpec(None, None)
