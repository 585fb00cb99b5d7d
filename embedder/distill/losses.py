"""Distillation losses (EmbeddingGemma's): embedding matching against a teacher's embeddings, and a
KL between the teacher's and the student's scores of each query's candidates."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from embedder.losses import MASKED_LOGIT, identity_masks, l2_normalize, masked_mean

# The teacher's signals reach the loss as arrays of the batch (`teacher_query` `[B, Dt]`,
# `teacher_positive` `[B, Dt]`, `teacher_negative` `[B, K, Dt]`, unit rows, and/or
# `teacher_scores` `[B, 1 + K]`: its cosine of each row's query with the positive and each hard
# negative). Where they come from (a stored pass joined by the data pipeline, or a teacher run in
# the step) is not the loss's concern.


def _rows_kept(rows_mask, b: int, fn: str) -> jax.Array:
    """`rows_mask` as a `[B]` bool array (every row when None)."""
    if rows_mask is None:
        return jnp.ones((b,), bool)
    if rows_mask.shape != (b,):
        raise ValueError(f"{fn}: rows_mask {rows_mask.shape} is not [B] = [{b}]")
    return rows_mask.astype(bool)


def _check_distill_inputs(name, student, teacher, projection):
    if teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"embedding_distillation: teacher {name} {teacher.shape} and student {name} "
                         f"{student.shape} differ in their leading (row) axes")
    width = student.shape[-1] if projection is None else projection.shape[-1]
    if projection is not None and projection.shape[0] != student.shape[-1]:
        raise ValueError(f"embedding_distillation: projection {projection.shape} does not start at the student "
                         f"width {student.shape[-1]}")
    if teacher.shape[-1] != width:
        raise ValueError(f"embedding_distillation: teacher width {teacher.shape[-1]} differs from the student's "
                         f"{width}; a learned student -> teacher projection is needed (the train step adds one "
                         "when the widths differ)")


def _match(student, teacher, projection, metric: str):
    """Per-vector distance of the unit student embedding (projected when `projection` is given)
    to the unit teacher embedding: `||s - t||^2` (l2) or `1 - cos(s, t)` (cosine)."""
    s = l2_normalize(student.astype(jnp.float32))
    if projection is not None:
        s = s @ projection.astype(jnp.float32)
    t = l2_normalize(teacher.astype(jnp.float32))
    if metric == "l2":
        return jnp.sum(jnp.square(s - t), axis=-1)
    return 1.0 - jnp.sum(l2_normalize(s) * t, axis=-1)


def embedding_distillation(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None,
    teacher_query: jax.Array,
    teacher_positive: jax.Array,
    teacher_negatives: jax.Array | None = None,
    negatives_mask: jax.Array | None = None,
    projection: jax.Array | None = None,
    rows_mask: jax.Array | None = None,
    *,
    distill_embedding_weight: float = 0.0,
    distill_embedding_metric: str = "cosine",
    distill_term_weights: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Embedding matching (EmbedDistill; EmbeddingGemma's three equally weighted terms): the
    student's query, positive and hard-negative embeddings pulled towards the teacher's.

    Each student embedding is L2-normalised at its full width, mapped by `projection` (`[D, Dt]`,
    a trained parameter) when the teacher's width `Dt` differs, and compared with the unit teacher
    embedding by `distill_embedding_metric`: "l2" (`||s - t||^2`) or "cosine" (`1 - cos`).
    Each term is a mean over the rows `rows_mask` (`[B]`, 1 = the teacher has this row; default
    all) keeps (negatives: over those rows' slots `negatives_mask` keeps; 0 when none); the loss
    is `distill_embedding_weight * (w_q L_q + w_p L_p + w_n L_n)` with
    `distill_term_weights = (w_q, w_p, w_n)`. Metrics: `distill_query`, `distill_positive`,
    `distill_negative` (unweighted terms) and `distill_embedding` (the weighted loss).
    """
    if distill_embedding_metric not in ("l2", "cosine"):
        raise ValueError(f"embedding_distillation: distill_embedding_metric={distill_embedding_metric!r}; "
                         "use 'l2' or 'cosine'")
    if len(distill_term_weights) != 3:
        raise ValueError(f"embedding_distillation: distill_term_weights={tuple(distill_term_weights)} needs 3 "
                         "weights (query, positive, negatives)")
    _check_distill_inputs("query", query, teacher_query, projection)
    _check_distill_inputs("positive", positive, teacher_positive, projection)
    w_q, w_p, w_n = (float(w) for w in distill_term_weights)
    rows = _rows_kept(rows_mask, query.shape[0], "embedding_distillation")
    terms = {"distill_query": masked_mean(_match(query, teacher_query, projection, distill_embedding_metric), rows),
             "distill_positive": masked_mean(_match(positive, teacher_positive, projection,
                                                     distill_embedding_metric), rows)}
    total = w_q * terms["distill_query"] + w_p * terms["distill_positive"]
    if negatives is not None and negatives.shape[1] > 0 and w_n:
        if teacher_negatives is None:
            raise ValueError("embedding_distillation: the batch has hard negatives but no teacher negatives; "
                             "set distill_term_weights' third entry to 0 or store the teacher's negatives")
        _check_distill_inputs("negatives", negatives, teacher_negatives, projection)
        per_slot = _match(negatives, teacher_negatives, projection, distill_embedding_metric)
        keep = jnp.ones(per_slot.shape, bool) if negatives_mask is None else negatives_mask.astype(bool)
        terms["distill_negative"] = masked_mean(per_slot, keep & rows[:, None])
        total = total + w_n * terms["distill_negative"]
    loss = distill_embedding_weight * total
    return loss, dict(terms, distill_embedding=loss)


def teacher_candidate_scores(
    teacher_query: jax.Array | None,
    teacher_positive: jax.Array | None,
    teacher_negatives: jax.Array | None,
    teacher_scores: jax.Array | None,
    query_ids: jax.Array | None = None,
    positive_ids: jax.Array | None = None,
    negative_ids: jax.Array | None = None,
    negatives_mask: jax.Array | None = None,
    *,
    mask_duplicates: bool = True,
    distill_in_batch: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """`(scores, keep)`, both `[B, B + K]`: the teacher's cosine of query i with every candidate
    of row i - the batch's positives (column j; `j = i` is its own) then row i's hard negatives -
    and which candidates the row's distribution is over.

    From teacher embeddings (`teacher_query`, `teacher_positive`, `teacher_negatives`), the
    other rows' positives are candidates when `distill_in_batch`, under `matryoshka_nce`'s
    text-identity masks (a duplicate query or positive is not a competitor). From stored
    `teacher_scores` (`[B, 1 + K]`: positive, then negatives) only the row's own candidates
    are known. Hard negatives count where `negatives_mask` keeps them and they are not a
    positive of the row's query (`matryoshka_nce`'s false-negative rule)."""
    if teacher_query is not None:
        b = teacher_query.shape[0]
    elif teacher_scores is not None:
        b = teacher_scores.shape[0]
    else:
        raise ValueError("teacher_candidate_scores: needs teacher embeddings or teacher_scores")
    k = 0
    if teacher_negatives is not None:
        k = teacher_negatives.shape[1]
    elif teacher_query is None and teacher_scores is not None:
        k = teacher_scores.shape[1] - 1
    if negatives_mask is not None and negatives_mask.shape != (b, k):
        raise ValueError(f"teacher_candidate_scores: negatives_mask {negatives_mask.shape} is not [B, K] = "
                         f"[{b}, {k}] (the teacher's candidates)")
    masks = identity_masks(b, k, query_ids, positive_ids, negative_ids if k else None,
                            negatives_mask if k else None, mask_duplicates=mask_duplicates,
                            global_hard_negatives=False)
    eye = jnp.eye(b, dtype=bool)
    if teacher_query is not None:
        tq = l2_normalize(teacher_query.astype(jnp.float32))
        cols = [tq @ l2_normalize(teacher_positive.astype(jnp.float32)).T]
        if k:
            cols.append(jnp.einsum("id,ikd->ik", tq, l2_normalize(teacher_negatives.astype(jnp.float32))))
        inbatch = (masks.inbatch | eye) if distill_in_batch else eye
    else:
        scores = teacher_scores.astype(jnp.float32)
        cols = [jnp.where(eye, scores[:, :1], 0.0)]
        if k:
            cols.append(scores[:, 1:])
        inbatch = eye
    keep = [inbatch] + ([masks.own_hard] if k else [])
    return jnp.concatenate(cols, axis=1), jnp.concatenate(keep, axis=1)


def _masked_log_softmax(logits, keep):
    x = jnp.where(keep, logits, MASKED_LOGIT)
    return jnp.where(keep, jax.nn.log_softmax(x, axis=-1), 0.0)


def score_distillation(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None,
    teacher_scores: jax.Array,
    candidates_mask: jax.Array,
    rows_mask: jax.Array | None = None,
    *,
    dims: Sequence[int] = (),
    dim_weights: Sequence[float] = (),
    distill_score_weight: float = 0.0,
    distill_student_temperature: float = 0.05,
    distill_teacher_temperature: float = 0.05,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Score distillation: `KL(teacher || student)` between the two softmax distributions over
    each row's candidates, per Matryoshka dim, summed over the dims with `dim_weights`.

    `teacher_scores`, `candidates_mask`: `[B, B + K]` (`teacher_candidate_scores`): columns the
    batch's positives then row i's hard negatives. The student's logits are its cosines at the
    dim's prefix over `distill_student_temperature`, the teacher's its scores over
    `distill_teacher_temperature`; masked candidates are in neither distribution, and a row
    with one candidate contributes 0. The KL is averaged over the rows `rows_mask` (`[B]`, 1 = the
    teacher has this row; default all) keeps. Metrics: `distill_kl_d{d}` and `distill_score` (the
    weighted loss).
    """
    for name, t in (("distill_student_temperature", distill_student_temperature),
                    ("distill_teacher_temperature", distill_teacher_temperature)):
        if isinstance(t, (int, float)) and t <= 0:
            raise ValueError(f"score_distillation: {name} must be > 0, got {t}")
    b, d = query.shape
    k = 0 if negatives is None else negatives.shape[1]
    if teacher_scores.shape != (b, b + k) or candidates_mask.shape != (b, b + k):
        raise ValueError(f"score_distillation: teacher_scores {teacher_scores.shape} and candidates_mask "
                         f"{candidates_mask.shape} must be [B, B + K] = [{b}, {b + k}]")
    dims = tuple(dims) or (d,)
    dim_weights = tuple(dim_weights) or (1.0,) * len(dims)
    if len(dim_weights) != len(dims):
        raise ValueError(f"score_distillation: {len(dim_weights)} dim_weights for {len(dims)} dims {dims}")
    keep = candidates_mask.astype(bool)
    rows = _rows_kept(rows_mask, b, "score_distillation")
    log_t = _masked_log_softmax(teacher_scores.astype(jnp.float32) / distill_teacher_temperature, keep)
    p_t = jnp.where(keep, jnp.exp(log_t), 0.0)
    query = query.astype(jnp.float32)
    positive = positive.astype(jnp.float32)
    metrics: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    for dim, weight in zip(dims, dim_weights):
        q = l2_normalize(query[:, :dim])
        cols = [q @ l2_normalize(positive[:, :dim]).T]
        if k:
            cols.append(jnp.einsum("id,ikd->ik", q, l2_normalize(negatives[:, :, :dim].astype(jnp.float32))))
        log_s = _masked_log_softmax(jnp.concatenate(cols, axis=1) / distill_student_temperature, keep)
        kl = masked_mean(jnp.sum(p_t * (log_t - log_s), axis=-1), rows)
        metrics[f"distill_kl_d{dim}"] = kl
        total = total + weight * kl
    loss = distill_score_weight * total
    metrics["distill_score"] = loss
    return loss, metrics


# Every loss function of the train step; `train.config.loss_defaults()` builds `config.loss` from
