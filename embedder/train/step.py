"""The pure train step `(state, batch, rng) -> (state, metrics)` and its sharded jit.

The step embeds queries, positives and hard negatives of the **global** batch,
computes Matryoshka NCE over all of it (every row of every device is a negative
for every row), and applies the optimizer. With `grad_cache_chunks > 1` the
gradient comes from the gradient cache instead, equal up to rounding.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from embedder import sharding
from embedder.data.batch_schema import encoder_inputs, is_packed
from embedder.distill.losses import embedding_distillation, score_distillation, teacher_candidate_scores
from embedder.losses import matryoshka_nce
from embedder.model.heads import TEACHER_PROJECTION, model_params
from embedder.train.config import loss_options
from embedder.train.loss_options import options_for
from embedder.train.grad_cache import cached_value_and_grad
from embedder.train.optim import frozen_labels
from embedder.train.state import TrainState, create_train_state  # noqa: F401  (re-exported)

QUERY_RNG, POSITIVE_RNG, NEGATIVE_RNG = 0, 1, 2


def _constrain_rows(x: jax.Array) -> jax.Array:
    # Embeddings stay split by rows over the data axes; the loss's matmuls then
    # gather what they need, instead of XLA replicating the encoder outputs.
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def embed_batch(model, params, batch: Mapping[str, jax.Array], rng: jax.Array,
                deterministic: bool = False) -> dict[str, jax.Array]:
    """`{"query": [B, D], "positive": [B, D], "negative": [B, K, D]}` (negative only when K > 0).

    A packed batch (`packed_ids`, `packed_sequence_ids`, `packed_positions`, all `[R, L]`,
    and `negatives_valid` `[B, K]`) numbers its sequences queries `0..B-1`, positives
    `B..2B-1`, then negatives `2B + b*K + k`, and runs the encoder once over all of them
    (a gradient-cache chunk holds some of the rows: the other sequences embed to zero).
    """
    if is_packed(batch):
        b, k = batch["negatives_valid"].shape
        emb = model.apply({"params": params}, batch["packed_ids"], None, deterministic=deterministic,
                          sequence_ids=batch["packed_sequence_ids"], positions=batch["packed_positions"],
                          num_sequences=b * (2 + k), rngs={"dropout": rng})
        out = {"query": _constrain_rows(emb[:b]), "positive": _constrain_rows(emb[b:2 * b])}
        if k > 0:
            out["negative"] = _constrain_rows(emb[2 * b:].reshape(b, k, -1))
        return out

    def encode(ids, mask, stream):
        return model.apply({"params": params}, ids, mask, deterministic=deterministic,
                           rngs={"dropout": jax.random.fold_in(rng, stream)})

    out = {"query": _constrain_rows(encode(batch["query_ids"], batch["query_mask"], QUERY_RNG)),
           "positive": _constrain_rows(encode(batch["positive_ids"], batch["positive_mask"], POSITIVE_RNG))}
    if "negative_ids" in batch and batch["negative_ids"].shape[1] > 0:
        b, k, length = batch["negative_ids"].shape
        neg = encode(batch["negative_ids"].reshape(b * k, length),
                     batch["negative_mask"].reshape(b * k, length), NEGATIVE_RNG)
        out["negative"] = _constrain_rows(neg.reshape(b, k, -1))
    return out


def batch_loss(embeddings: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
               options: Mapping[str, Any], projection: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The loss of a batch's embeddings, with its text-identity hashes and negative validity;
    `options`: every loss option (`config.loss_options`). Matryoshka NCE, plus embedding and
    score distillation when their weights are on, from the teacher entries of the batch
    (`teacher_query`, `teacher_positive`, `teacher_negative`, `teacher_scores`, and `teacher_valid`:
    the rows they cover, the others are not distilled); `projection`:
    the learned student -> teacher map (`params[TEACHER_PROJECTION]`), when the widths differ.
    Metrics: `nce` and each distillation term; `loss` is the total."""
    negatives = embeddings.get("negative")
    # With loss.mask_duplicates, matryoshka_nce refuses a batch without the text-identity hashes.
    ids = dict(query_ids=batch.get("query_hash"), positive_ids=batch.get("positive_hash"),
               negative_ids=batch.get("negative_hash") if negatives is not None else None,
               negatives_mask=batch.get("negatives_valid") if negatives is not None else None)
    loss, metrics = matryoshka_nce(embeddings["query"], embeddings["positive"], negatives, **ids,
                                   **options_for(matryoshka_nce, options))
    metrics = dict(metrics, nce=loss)
    if options.get("distill_embedding_weight", 0.0):
        if "teacher_query" not in batch:
            raise ValueError("loss.distill_embedding_weight > 0 needs the teacher's embeddings in the batch: "
                             "set data.teacher to signals stored with embeddings (--store embeddings)")
        part, terms = embedding_distillation(
            embeddings["query"], embeddings["positive"], negatives, batch["teacher_query"],
            batch["teacher_positive"], batch.get("teacher_negative") if negatives is not None else None,
            ids["negatives_mask"], projection, batch.get("teacher_valid"),
            **options_for(embedding_distillation, options))
        loss, metrics = loss + part, dict(metrics, **terms)
    if options.get("distill_score_weight", 0.0):
        if "teacher_query" not in batch and "teacher_scores" not in batch:
            raise ValueError("loss.distill_score_weight > 0 needs the teacher's embeddings or scores in the batch: "
                             "set data.teacher to the signals of `python -m embedder.distill teacher`")
        with_embeddings = "teacher_query" in batch
        scores, keep = teacher_candidate_scores(
            batch.get("teacher_query"), batch.get("teacher_positive"),
            batch.get("teacher_negative") if with_embeddings and negatives is not None else None,
            None if with_embeddings else batch["teacher_scores"], **ids,
            **options_for(teacher_candidate_scores, options))
        part, terms = score_distillation(embeddings["query"], embeddings["positive"], negatives, scores, keep,
                                         batch.get("teacher_valid"), **options_for(score_distillation, options))
        loss, metrics = loss + part, dict(metrics, **terms)
    metrics["loss"] = loss
    return loss, metrics


def stop_frozen_gradients(params, frozen: Sequence[str]):
    """`params` with `jax.lax.stop_gradient` on the leaves whose path matches a `frozen` regex
    (`optimizer.frozen`): their gradient is a symbolic zero, so the backward pass never computes
    it (for a frozen embedding table: no scatter into a [vocab, width] gradient every step)."""
    if not frozen:
        return params
    labels = frozen_labels(params, frozen)
    return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p, params, labels)


def make_grad_fn(model, loss_config, *, grad_cache_chunks: int = 0, frozen: Sequence[str] = ()):
    """`(params, batch, rng) -> ((loss, metrics), grads)`, full-batch or gradient-cached; the
    gradient of parameters matching a `frozen` regex is zero and never computed."""
    options = loss_options(loss_config)
    if not options["dims"] and hasattr(model, "config"):  # the model's own Matryoshka dims
        options["dims"] = model.config.matryoshka_dims
    chunks = int(grad_cache_chunks)
    if chunks < 0:
        raise ValueError(f"grad_cache_chunks must be >= 0 (0 or 1: off), got {chunks}")
    frozen = tuple(frozen)

    def embed(params, batch, rng):
        return embed_batch(model, stop_frozen_gradients(params, frozen), batch, rng)

    def loss_of_embeddings(batch):
        # loss_params: what the loss itself trains ({} or the student -> teacher map's params).
        def loss(emb, loss_params):
            projection = loss_params[TEACHER_PROJECTION]["projection"]["w"] if loss_params else None
            return batch_loss(emb, batch, options, projection)
        return loss

    def split(params):
        if TEACHER_PROJECTION not in params:
            return params, {}
        # Frozen patterns name paths of the whole tree (they need not match the loss's own params).
        loss_params = {TEACHER_PROJECTION: stop_frozen_gradients(params, frozen)[TEACHER_PROJECTION]}
        return model_params(params), loss_params

    if chunks <= 1:
        def grad_fn(params, batch, rng):
            def loss_fn(prm):
                encoder, loss_params = split(prm)
                return loss_of_embeddings(batch)(embed(encoder, batch, rng), loss_params)
            return jax.value_and_grad(loss_fn, has_aux=True)(params)
    else:
        def grad_fn(params, batch, rng):
            encoder, loss_params = split(params)
            if is_packed(batch):  # chunks of packed rows; each chunk embeds all sequences, zero elsewhere
                shape_carrier = {"negatives_valid": batch["negatives_valid"]}
                value, (grads, loss_grads) = cached_value_and_grad(
                    lambda prm, chunk, key: embed(prm, dict(chunk, **shape_carrier), key),
                    loss_of_embeddings(batch), encoder, encoder_inputs(batch), rng, chunks, combine="sum",
                    loss_params=loss_params)
            else:
                value, (grads, loss_grads) = cached_value_and_grad(
                    embed, loss_of_embeddings(batch), encoder, encoder_inputs(batch), rng, chunks,
                    loss_params=loss_params)
            return value, dict(grads, **loss_grads) if loss_grads else grads
    return grad_fn


def tree_norm(tree) -> jax.Array:
    """Global L2 norm of a tree, each leaf's sum of squares as a dot product: XLA:CPU splits
    `sum(x * x)` into a squaring pass that materialises `x * x` and a reduction (a 640 MiB
    temporary for Gemma 3 270M's embedding table in every step), while a dot reads `x` once."""
    squares = [jnp.vdot(x, x, preferred_element_type=jnp.float32) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares)) if squares else jnp.zeros((), jnp.float32)


def make_train_step(model, loss_config, optimizer: optax.GradientTransformation, *,
                    grad_cache_chunks: int = 0, frozen: Sequence[str] = ()) -> Callable:
    """A pure `(state, batch, rng) -> (state, metrics)` for `jit_train_step`.

    `loss_config`: the train config's `loss` entry or a dict: `matryoshka_nce`'s keyword arguments;
    empty `dims`: the model's `config.matryoshka_dims` (`model.mrl_dims`).
    `grad_cache_chunks > 1` computes the gradient with the gradient cache in that many chunks.
    `frozen`: the optimizer's frozen-path regexes (`optimizer.frozen`), whose gradients are
    then not computed at all (the optimizer keeps those parameters fixed either way).
    """
    grad_fn = make_grad_fn(model, loss_config, grad_cache_chunks=grad_cache_chunks, frozen=frozen)

    def trained(tree, labels):
        """The leaves of trained parameters: a frozen leaf's gradient and update are zeros, whose
        norm XLA would constant-fold at compile time (seconds for an embedding table)."""
        return [x for x, label in zip(jax.tree.leaves(tree), jax.tree.leaves(labels)) if label == "train"]

    def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
        (loss, metrics), grads = grad_fn(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        labels = frozen_labels(state.params, frozen) if frozen else jax.tree.map(lambda _: "train", grads)
        metrics = dict(metrics, loss=loss, grad_norm=tree_norm(trained(grads, labels)),
                       update_norm=tree_norm(trained(updates, labels)), param_norm=tree_norm(params))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _mesh_of(where) -> Mesh:
    if isinstance(where, Mesh):
        return where
    if isinstance(where, NamedSharding):
        return where.mesh
    leaves = jax.tree.leaves(where, is_leaf=lambda x: isinstance(x, NamedSharding))
    if leaves and isinstance(leaves[0], NamedSharding):
        return leaves[0].mesh
    raise TypeError(f"jit_train_step: expected a Mesh or batch NamedSharding(s), got {type(where).__name__}")


def jit_train_step(step_fn: Callable, state_shardings: TrainState, batch_sharding, *, rules=None,
                   compiler_options: dict | None = None):
    """`jax.jit` of the step with explicit shardings and the old state donated.

    `batch_sharding`: a `Mesh` (every batch entry split by rows over the data axes),
    one `NamedSharding` for all entries, or a dict of them. `rules`: the logical-axis
    rules for activation constraints while tracing (default: the rules active at
    trace time, else `sharding.DEFAULT_RULES`). `compiler_options`: per-executable XLA options
    (`xla_cpu_flags.compiler_options`). Lower and compile it under `jax.set_mesh(mesh)`.
    """
    mesh = _mesh_of(batch_sharding)
    if isinstance(batch_sharding, Mesh):
        batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())

    def step_with_rules(state, batch, rng):
        active = rules if rules is not None else (nn.get_logical_axis_rules() or sharding.DEFAULT_RULES)
        with nn.logical_axis_rules(active):
            return step_fn(state, batch, rng)

    return jax.jit(step_with_rules, in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0,
                   compiler_options=compiler_options)
