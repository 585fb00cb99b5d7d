"""`TrainState` (step, params, opt_state) and its creation, born sharded on the mesh."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from embedder import sharding
from embedder.data.batch_schema import PACKED_INPUTS, is_packed
from embedder.model.heads import TEACHER_PROJECTION, TeacherProjection


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def _query_length(example_batch_shapes: Mapping[str, Any]) -> int:
    key = PACKED_INPUTS[0] if is_packed(example_batch_shapes) else "query_ids"
    if key not in example_batch_shapes:
        raise ValueError("create_train_state: example_batch_shapes needs a 'query_ids' entry "
                         "([B, L] int32, ARCHITECTURE.md 'Batches'), or 'packed_ids' for packed "
                         f"batches; got {sorted(example_batch_shapes)}")
    shape = example_batch_shapes[key]
    shape = tuple(shape.shape) if hasattr(shape, "shape") else tuple(shape)
    return int(shape[-1])


def _boxed_init_fn(model, length: int, teacher_dim: int = 0):
    # Parameters do not depend on the batch size, so one row is enough to trace init.
    # `teacher_dim` > 0 adds the learned student -> teacher map of embedding distillation.
    def init(rng):
        ids = jnp.zeros((1, length), jnp.int32)
        params = model.init({"params": rng, "dropout": rng}, ids, jnp.ones_like(ids))["params"]
        if teacher_dim:
            width = jax.eval_shape(lambda p: model.apply({"params": p}, ids, jnp.ones_like(ids)), params).shape[-1]
            projection = TeacherProjection(int(teacher_dim))
            params = dict(params, **{TEACHER_PROJECTION: projection.init(
                jax.random.fold_in(rng, 1), jnp.zeros((1, width), jnp.float32))["params"]})
        return params

    return init


def state_shardings_for(model, optimizer: optax.GradientTransformation, mesh: Mesh, rules,
                        example_batch_shapes: Mapping[str, Any], teacher_dim: int = 0):
    """(abstract TrainState, TrainState of NamedShardings); nothing is allocated. `teacher_dim` > 0:
    the params also hold a `[D, teacher_dim]` student -> teacher map (`TEACHER_PROJECTION`).

    Parameters follow their logical axis names; optimizer slots that mirror a
    parameter (Adam moments) take its sharding, everything else is replicated.
    """
    init = _boxed_init_fn(model, _query_length(example_batch_shapes), teacher_dim)
    boxed = jax.eval_shape(init, jax.random.key(0))
    param_sh = sharding.param_shardings(boxed, mesh, rules)
    params = nn.meta.unbox(boxed)
    opt_state = jax.eval_shape(optimizer.init, params)
    replicated = sharding.replicated(mesh)
    # A frozen parameter's optimizer slot is an empty MaskedNode: it stays one here, so this tree
    # has the state's structure exactly (tree maps over both, restore targets).
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_sh = optax.tree_map_params(optimizer, lambda x, s: x if masked(x) else s, opt_state, param_sh,
                                   transform_non_params=lambda x: x if masked(x) else replicated,
                                   is_leaf=masked)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
    return abstract, TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


def abstract_state(state, shardings):
    """`state` (arrays or shape/dtype structs) as `jax.ShapeDtypeStruct` leaves placed on
    `shardings` (a tree of the same structure): the target of a restore or an AOT lowering."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def create_train_state(model, optimizer: optax.GradientTransformation, rng, mesh: Mesh, rules,
                       example_batch_shapes: Mapping[str, Any], shardings: TrainState | None = None,
                       teacher_dim: int = 0):
    """Initialises `TrainState` directly into its shardings (`jax.jit(init, out_shardings=...)`),
    so no device ever holds the full unsharded parameters. Returns `(state, state_shardings)`;
    `shardings`: those of `state_shardings_for`, when already known."""
    if shardings is None:
        _, shardings = state_shardings_for(model, optimizer, mesh, rules, example_batch_shapes, teacher_dim)
    init_params = _boxed_init_fn(model, _query_length(example_batch_shapes), teacher_dim)

    def init(rng):
        with nn.logical_axis_rules(rules):
            params = nn.meta.unbox(init_params(rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    with jax.set_mesh(mesh):
        state = jax.jit(init, in_shardings=sharding.replicated(mesh), out_shardings=shardings)(rng)
    return state, shardings
