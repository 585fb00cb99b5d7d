"""Train state, optimizer and the sharded train step: sharded runs equal single-device runs."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder import sharding
from embedder.train.optim import make_optimizer, make_schedule, weight_decay_mask
from embedder.train.state import create_train_state
from embedder.train.step import jit_train_step, make_train_step

B, K, LQ, LD, VOCAB = 16, 2, 6, 8, 64
LOSS = {"dims": (16, 8), "temperature": 0.05, "global_hard_negatives": True, "hardness_alpha": 1.0,
        "same_tower": True}
OPT = {"learning_rate": 3e-2, "warmup_steps": 1, "schedule": "linear", "weight_decay": 0.1,
       "grad_clip_norm": 1.0}
# (data 8), (data 4, fsdp 2), (data 2, fsdp 2, tensor 2); size-1 axes keep every rule's axis defined.
MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2)]
AXES = ("data", "fsdp", "tensor")


class StandInEncoder(nn.Module):
    """Token embedding -> LayerNorm -> masked mean pool -> MLP -> projection, logically partitioned.

    Compiles in a fraction of the real encoder's time, which keeps the many-mesh
    tests cheap; the same `apply` signature as `EmbeddingModel`.
    """

    hidden: int = 32
    out: int = 16
    dropout: float = 0.0

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic=True):
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                           (VOCAB, self.hidden))
        x = jnp.take(table, input_ids, axis=0)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = nn.LayerNorm(name="norm", scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(x)
        mask = attention_mask[..., None].astype(x.dtype)
        x = jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        x = nn.Dense(64, name="up", kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        x = nn.Dropout(self.dropout)(jax.nn.gelu(x), deterministic=deterministic)
        x = nn.Dense(self.out, use_bias=False, name="proj",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "proj")))(x)
        return nn.with_logical_constraint(x, ("batch", "proj"))


def make_batch(seed=0, b=B, k=K):
    """A batch in ARCHITECTURE.md's layout with duplicate texts, false and missing negatives."""
    rng = np.random.default_rng(seed)
    ids = lambda *shape: rng.integers(1, VOCAB, shape).astype(np.int32)

    def mask(*shape):
        lengths = rng.integers(2, shape[-1] + 1, shape[:-1])
        return (np.arange(shape[-1]) < lengths[..., None]).astype(np.int32)

    batch = {"query_ids": ids(b, LQ), "query_mask": mask(b, LQ), "positive_ids": ids(b, LD),
             "positive_mask": mask(b, LD), "negative_ids": ids(b, k, LD), "negative_mask": mask(b, k, LD),
             "negatives_valid": rng.random((b, k)) > 0.25,
             "query_hash": np.stack([np.arange(b), np.zeros(b)], 1).astype(np.uint32),
             "positive_hash": np.stack([np.arange(b) + 100, np.zeros(b)], 1).astype(np.uint32),
             "negative_hash": (np.arange(b * k).reshape(b, k, 1) + np.array([1000, 0])).astype(np.uint32),
             "dataset": np.zeros(b, np.int32)}
    # Rows 1 and 3 share a positive text (and its tokens), row 2's first negative is row 5's positive.
    batch["positive_ids"][3], batch["positive_mask"][3] = batch["positive_ids"][1], batch["positive_mask"][1]
    batch["positive_hash"][3] = batch["positive_hash"][1]
    batch["negative_ids"][2, 0], batch["negative_mask"][2, 0] = batch["positive_ids"][5], batch["positive_mask"][5]
    batch["negative_hash"][2, 0] = batch["positive_hash"][5]
    return batch


def mesh_of(shape, devices=None):
    return sharding.make_mesh({"axes": AXES, "shape": shape}, devices=devices)


def run_steps(model, mesh, batches, *, loss=LOSS, opt=OPT, chunks=0, seed=0):
    """Losses of each step and the final params (numpy), on `mesh`."""
    optimizer = make_optimizer(opt, total_steps=10)
    rules = sharding.DEFAULT_RULES
    with jax.set_mesh(mesh):
        state, shardings = create_train_state(model, optimizer, jax.random.key(seed), mesh, rules, batches[0])
        step = jit_train_step(make_train_step(model, loss, optimizer, grad_cache_chunks=chunks), shardings, mesh)
        compiled = step.lower(state, sharding.host_to_global(batches[0], mesh), jax.random.key(1)).compile()
        first_state = state
        # A copy: a zero-copy numpy view would pin the buffer and silently block donation.
        first_kernel = np.array(state.params["up"]["kernel"]).copy()
        losses = []
        for i, batch in enumerate(batches):
            state, metrics = compiled(state, sharding.host_to_global(batch, mesh), jax.random.fold_in(jax.random.key(1), i))
            losses.append(float(metrics["loss"]))
            if i == 0:
                assert first_state.params["up"]["kernel"].is_deleted()  # donated
                if opt.get("warmup_steps", 0) > 0:  # warmup starts the learning rate at 0
                    np.testing.assert_array_equal(np.asarray(state.params["up"]["kernel"]), first_kernel)
    assert int(state.step) == len(batches)
    return losses, jax.tree.map(np.asarray, state.params), state, shardings


@pytest.fixture(scope="module")
def single_device_run():
    batches = [make_batch(s) for s in range(3)]
    return batches, run_steps(StandInEncoder(), mesh_of((1, 1, 1), jax.devices()[:1]), batches)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "data{}_fsdp{}_tensor{}".format(*s))
def test_three_sharded_steps_equal_single_device(single_device_run, shape):
    batches, (want_losses, want_params, _, _) = single_device_run
    losses, params, state, shardings = run_steps(StandInEncoder(), mesh_of(shape), batches)
    assert len(set(want_losses)) == 3, "the loss must change between steps, or the test proves nothing"
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for path, got in jax.tree_util.tree_leaves_with_path(params):
        want = want_params
        for key in path:
            want = want[key.key]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # State stays where create_train_state put it, born sharded.
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    # Adam moments are sharded like their parameters.
    mu = state.opt_state[1][0].mu
    assert mu["up"]["kernel"].sharding.is_equivalent_to(shardings.params["up"]["kernel"], 2)
    if shape[1] > 1:
        assert "fsdp" in str(shardings.params["up"]["kernel"].spec)


def test_schedule_values():
    cfg = {"learning_rate": 1.0, "warmup_steps": 4, "schedule": "cosine", "end_lr_fraction": 0.1}
    sched = make_schedule(cfg, total_steps=14)
    for step in range(15):
        if step < 4:
            want = step / 4
        else:
            t = min(step - 4, 10) / 10
            want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        assert float(sched(step)) == pytest.approx(want, abs=1e-6), step
    lin = make_schedule({"learning_rate": 2.0, "warmup_steps": 0, "schedule": "linear"}, total_steps=8)
    assert [float(lin(s)) for s in (0, 4, 8)] == pytest.approx([2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="schedule"):
        make_schedule({"schedule": "step"}, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_schedule({"warmup_steps": 20}, 10)


def test_decay_mask_and_frozen_subtrees():
    from embedder.model import EmbeddingModel
    from embedder.model.config import get_model_config

    for name in ("tiny", "tiny-bert"):
        ids = jnp.ones((1, 4), jnp.int32)
        params = nn.meta.unbox(jax.eval_shape(
            lambda: EmbeddingModel(get_model_config(name)).init(jax.random.key(0), ids, ids))["params"])
        mask = weight_decay_mask(params)
        flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
        for path, decayed in flat.items():
            is_matrix = path.endswith("['w']") and "norm" not in path
            assert decayed == is_matrix, path
        assert all(jax.tree.leaves(weight_decay_mask(params, decay_everything=True)))

    # Frozen parameters get zero updates and carry no optimizer moments; the rest trains.
    params = nn.meta.unbox(StandInEncoder().init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                                                 jnp.ones((1, 4), jnp.int32))["params"])
    optimizer = make_optimizer(dict(OPT, warmup_steps=0, frozen=("^embedding$", "norm/")), total_steps=10)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, opt_state, params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        name = jax.tree_util.keystr(path)
        frozen = "embedding" in name or "norm" in name
        assert bool(jnp.all(u == 0)) == frozen, name
    moments = sum(x.size for x in jax.tree.leaves(opt_state))
    trainable = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                    if "embedding" not in jax.tree_util.keystr(p) and "norm" not in jax.tree_util.keystr(p))
    assert moments == 2 * trainable + 2  # mu, nu of trainable params + Adam count + schedule count
    with pytest.raises(ValueError, match="matches no parameter"):
        make_optimizer(dict(OPT, frozen=("encodr/",)), 10).init(params)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="adamw"):
        make_optimizer({"name": "sgd"}, 10)
    with pytest.raises(ValueError, match="unknown loss option"):
        make_train_step(StandInEncoder(), {"dims": (8,), "temperatur": 0.1}, make_optimizer(OPT, 10))
    with pytest.raises(ValueError, match="grad_cache_chunks"):
        make_train_step(StandInEncoder(), LOSS, make_optimizer(OPT, 10), grad_cache_chunks=-2)


def _one_step(model, batch, mesh, loss):
    optimizer = make_optimizer(OPT, total_steps=10)
    with jax.set_mesh(mesh):
        state, shardings = create_train_state(model, optimizer, jax.random.key(0), mesh,
                                              sharding.DEFAULT_RULES, batch)
        step = jit_train_step(make_train_step(model, loss, optimizer), shardings, mesh)
        state, metrics = step(state, sharding.host_to_global(batch, mesh), jax.random.key(1))
        return jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}


def test_packed_step_equals_padded_step():
    """A packed batch (one encoder call over packed rows, split over 8 devices) gives the
    padded single-device step's loss, gradient norm and updated parameters, on the real
    encoder, with hard negatives, missing negatives and duplicate texts."""
    from embedder.data.packing import pack_batch
    from embedder.model import EmbeddingModel, get_model_config

    model = EmbeddingModel(get_model_config("tiny-bert"))
    batch = make_batch(3)
    packed = pack_batch(batch, pad_id=0, row_multiple=8)
    assert packed["packed_ids"].shape[0] < B * (2 + K)  # rows were shared
    loss = dict(LOSS, mask_duplicates=True)
    p_pad, m_pad = _one_step(model, batch, mesh_of((1, 1, 1), jax.devices()[:1]), loss)
    p_pack, m_pack = _one_step(model, packed, mesh_of((8, 1, 1)), loss)
    for key in ("loss", "grad_norm", "update_norm"):
        np.testing.assert_allclose(m_pack[key], m_pad[key], rtol=2e-5, err_msg=key)
    for (path, a), b in zip(jax.tree.leaves_with_path(p_pad), jax.tree.leaves(p_pack)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_gradient_cached_packed_step_equals_padded_step():
    """The gradient cache over chunks of packed rows (each chunk embeds every sequence, zero
    outside its rows; 2 chunks on 8 devices) gives the padded single-device full-batch step."""
    from embedder.data.packing import pack_batch
    from embedder.model import EmbeddingModel, get_model_config

    model = EmbeddingModel(get_model_config("tiny-bert"))
    batch = make_batch(4)
    packed = pack_batch(batch, pad_id=0, row_multiple=16)   # 2 chunks x 8 devices
    loss = dict(LOSS, mask_duplicates=True)
    p_pad, m_pad = _one_step(model, batch, mesh_of((1, 1, 1), jax.devices()[:1]), loss)
    optimizer = make_optimizer(OPT, total_steps=10)
    mesh = mesh_of((8, 1, 1))
    with jax.set_mesh(mesh):
        state, shardings = create_train_state(model, optimizer, jax.random.key(0), mesh,
                                              sharding.DEFAULT_RULES, packed)
        step = jit_train_step(make_train_step(model, loss, optimizer, grad_cache_chunks=2), shardings, mesh)
        state, metrics = step(state, sharding.host_to_global(packed, mesh), jax.random.key(1))
    for key in ("loss", "grad_norm", "update_norm"):
        np.testing.assert_allclose(float(metrics[key]), m_pad[key], rtol=2e-5, err_msg=key)
    for (path, a), b in zip(jax.tree.leaves_with_path(p_pad), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(b), a, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def _np_masked_nce(q, p, n, valid, q_hash, p_hash, n_hash, dims, temperature, mask_duplicates):
    """Matryoshka NCE by the formula, one row and one term at a time (own hard negatives only)."""
    same = lambda a, b: bool(np.all(a == b))  # noqa: E731
    unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
    b, k = valid.shape
    total = 0.0
    for d in dims:
        rows = []
        for i in range(b):
            qi = unit(q[i, :d])
            pos = np.exp(qi @ unit(p[i, :d]) / temperature)
            denominator = pos
            for j in range(b):
                duplicate = same(q_hash[i], q_hash[j]) or same(p_hash[i], p_hash[j])
                if j != i and not (mask_duplicates and duplicate):
                    denominator += np.exp(qi @ unit(p[j, :d]) / temperature)
            for kk in range(k):
                false_negative = any(same(q_hash[m], q_hash[i]) and same(n_hash[i, kk], p_hash[m])
                                     for m in range(b))
                if valid[i, kk] and not (mask_duplicates and false_negative):
                    denominator += np.exp(qi @ unit(n[i, kk, :d]) / temperature)
            rows.append(-np.log(pos / denominator))
        total += np.mean(rows)
    return total


def test_train_step_masks_duplicate_texts_as_numpy_says():
    """A real sharded train step on a batch with a duplicate query, a shared positive and false
    negatives: its loss with and without `mask_duplicates` equals a float64 NumPy reference."""
    batch = make_batch(5)
    copy = lambda dst, src: [batch[key].__setitem__(dst, batch[key][src])  # noqa: E731
                             for key in ("query_ids", "query_mask", "query_hash")]
    copy(7, 6)                                                   # row 7 asks row 6's query
    for row, kk, src in ((6, 0, 7), (4, 1, 4)):                  # false negatives: a positive of the
        batch["negative_ids"][row, kk] = batch["positive_ids"][src]   # same query text, the own positive
        batch["negative_mask"][row, kk] = batch["positive_mask"][src]
        batch["negative_hash"][row, kk] = batch["positive_hash"][src]
        batch["negatives_valid"][row, kk] = True
    model, mesh = StandInEncoder(), mesh_of((4, 2, 1))
    # At temperature 0.1 each masking rule alone moves this loss by more than 0.016.
    base = {"dims": (16, 8), "temperature": 0.1}
    optimizer = make_optimizer(OPT, total_steps=10)
    losses = {}
    for masked in (True, False):
        loss = dict(base, mask_duplicates=masked)
        with jax.set_mesh(mesh):
            state, shardings = create_train_state(model, optimizer, jax.random.key(0), mesh,
                                                  sharding.DEFAULT_RULES, batch)
            params = jax.tree.map(np.asarray, state.params)
            step = jit_train_step(make_train_step(model, loss, optimizer), shardings, mesh)
            _, metrics = step(state, sharding.host_to_global(batch, mesh), jax.random.key(1))
        losses[masked] = float(metrics["loss"])
    # The step's loss is at the initial parameters: embed with them (no dropout) for the reference.
    embed = lambda ids, mask: np.asarray(model.apply({"params": params}, ids, mask), np.float64)  # noqa: E731
    b, k, length = batch["negative_ids"].shape
    q, p = embed(batch["query_ids"], batch["query_mask"]), embed(batch["positive_ids"], batch["positive_mask"])
    n = embed(batch["negative_ids"].reshape(b * k, length), batch["negative_mask"].reshape(b * k, length))
    args = (q, p, n.reshape(b, k, -1), batch["negatives_valid"], batch["query_hash"], batch["positive_hash"],
            batch["negative_hash"], base["dims"], base["temperature"])
    want = {masked: _np_masked_nce(*args, mask_duplicates=masked) for masked in (True, False)}
    assert want[False] - want[True] > 0.05, "the duplicates must matter, or the test proves nothing"
    assert losses[True] == pytest.approx(want[True], rel=1e-5)
    assert losses[False] == pytest.approx(want[False], rel=1e-5)
    assert losses[False] - losses[True] == pytest.approx(want[False] - want[True], abs=1e-4)


@pytest.mark.parametrize("missing", ["query_hash", "positive_hash", "negative_hash"])
def test_missing_text_ids_with_mask_duplicates_is_an_error(missing):
    batch = {k: v for k, v in make_batch(0).items() if k != missing}
    model, mesh = StandInEncoder(), mesh_of((1, 1, 1), jax.devices()[:1])
    optimizer = make_optimizer(OPT, total_steps=10)
    with jax.set_mesh(mesh):
        state, shardings = create_train_state(model, optimizer, jax.random.key(0), mesh,
                                              sharding.DEFAULT_RULES, batch)
        for masked in (True, False):
            step = jit_train_step(make_train_step(model, dict(LOSS, mask_duplicates=masked), optimizer),
                                  shardings, mesh)
            lowered = lambda: step.lower(state, sharding.host_to_global(batch, mesh), jax.random.key(1))  # noqa: E731
            if masked:
                ids = missing.replace("_hash", "_ids")   # the loss's argument the batch entry feeds
                with pytest.raises(ValueError, match=f"mask_duplicates=True needs the text ids {ids}"):
                    lowered()
            else:
                lowered()   # without the mask the hashes are not needed


def test_frozen_parameters_get_no_gradient_computed_and_train_as_before():
    """`frozen` in make_train_step stops the gradient of frozen leaves (no scatter into the embedding
    table's gradient); the run equals the optimizer-only freezing it replaces."""
    from embedder.train.step import make_grad_fn

    frozen = ("^embedding$",)
    opt = dict(OPT, frozen=frozen)
    model = StandInEncoder()
    batch = make_batch(0)
    params = nn.meta.unbox(model.init(jax.random.key(0), batch["query_ids"], batch["query_mask"])["params"])
    table_gradient = f"f32[{VOCAB},32] = scatter-add"   # the embedding gather's backward
    for stopped, expect_scatter in ((frozen, False), ((), True)):
        jaxpr = str(jax.make_jaxpr(make_grad_fn(model, LOSS, frozen=stopped))(params, batch, jax.random.key(1)))
        assert (table_gradient in jaxpr) == expect_scatter
    optimizer = make_optimizer(opt, total_steps=10)
    mesh = mesh_of((1, 1, 1), jax.devices()[:1])
    results = []
    for stopped in (frozen, ()):
        with jax.set_mesh(mesh):
            state, shardings = create_train_state(model, optimizer, jax.random.key(0), mesh, sharding.DEFAULT_RULES,
                                                  batch)
            step = jit_train_step(make_train_step(model, LOSS, optimizer, frozen=stopped), shardings, mesh)
            table = np.array(state.params["embedding"]).copy()
            for i in range(2):
                state, metrics = step(state, sharding.host_to_global(make_batch(i), mesh), jax.random.key(i))
        np.testing.assert_array_equal(np.asarray(state.params["embedding"]), table)
        results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_dims_default_to_the_model_s_own():
    """An empty `loss.dims` trains the model's `mrl_dims`; explicit dims override them (traced only)."""
    from embedder.model import EmbeddingModel, get_model_config
    from embedder.train.step import make_grad_fn

    model = EmbeddingModel(get_model_config("tiny", vocab_size=VOCAB))   # mrl_dims (32, 16, 8)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), batch["query_ids"],
                                                             batch["query_mask"])["params"]))
    for loss, want in (({}, {32, 16, 8}), ({"dims": (16,)}, {16})):
        (_, metrics), _ = jax.eval_shape(make_grad_fn(model, loss), params, batch, jax.random.key(1))
        assert {int(k[len("loss_d"):]) for k in metrics if k.startswith("loss_d")} == want


def test_a_frozen_state_resumes_from_its_checkpoint(tmp_path):
    """A frozen table's optimizer slots are empty MaskedNodes: the shardings tree keeps them, so the
    restore target the train loop builds has the state's structure and a trained step restores."""
    from embedder.checkpoint import TrainCheckpointer
    from embedder.train.state import abstract_state

    model, mesh, batch = StandInEncoder(), mesh_of((4, 2, 1)), make_batch(0)
    optimizer = make_optimizer(dict(OPT, frozen=("^embedding$",)), total_steps=10)
    with jax.set_mesh(mesh):
        state, shardings = create_train_state(model, optimizer, jax.random.key(0), mesh,
                                              sharding.DEFAULT_RULES, batch)
        assert jax.tree.structure(state) == jax.tree.structure(shardings)
        step = jit_train_step(make_train_step(model, LOSS, optimizer), shardings, mesh)
        state, _ = step(state, sharding.host_to_global(batch, mesh), jax.random.key(1))
        with TrainCheckpointer(tmp_path, async_save=False) as ckpt:
            ckpt.save(1, state, {"step": 1}, {"seed": 0})
            fresh, _ = create_train_state(model, optimizer, jax.random.key(5), mesh, sharding.DEFAULT_RULES, batch)
            restored, data, _ = ckpt.restore(abstract_state=abstract_state(fresh, shardings))
    assert data == {"step": 1}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == want.sharding
