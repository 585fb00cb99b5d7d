"""Matryoshka NCE: the in-batch contrastive loss of Gemini Embedding / EmbeddingGemma, per MRL prefix.

See method.md ("Loss") for the formula. Masking rules, in one place:

* In-batch column `p_j` (j != i) is removed from row i's denominator when
  `q_i == q_j` or `p_i == p_j` as texts (ids), never by embedding similarity.
  The row's own positive stays in the denominator unless `literal_mask`, the
  papers' literal formula, where the diagonal is masked too.
* A hard negative `n` is a **false negative** for row i, and is removed, when
  its text equals a positive of row i's query anywhere in the batch: `n == p_m`
  for some m with `q_m == q_i` (m = i included, so `n == p_i` always counts).
  Invalid slots (`negatives_mask` False) are removed too. With
  `global_hard_negatives`, row i also sees every other row's hard negatives,
  under the same rule; a negative of a duplicate query stays (it is a
  negative for that text as well).
* Same-tower columns `q_j` (j != i) use the in-batch mask; `q_i` never counts.
* A row whose denominator ends up empty (only possible with `literal_mask`)
  contributes 0: there is nothing to contrast it with.

Hardness weighting adds `alpha * stop_gradient(cos)` to every kept hard-negative
logit (own and, with `global_hard_negatives`, other rows'); in-batch and
same-tower columns are never reweighted. The spread-out regulariser follows
EmbeddingGemma literally (all pairs i != j, duplicates included: identical
texts add a constant with zero gradient).
"""

from __future__ import annotations

import inspect
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

# Logit given to masked entries: finite so that gradients through `where` stay
# finite, and so small that exp() underflows to exactly 0 in float32.
_MASKED = -1e9


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / ||x||` along `axis`; an all-zero vector stays zero instead of becoming NaN."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def ids_equal(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[N, M]` bool: row ids of `a` (`[N]` or `[N, W]`) equal those of `b` on all trailing entries."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"text ids have different widths {a.shape[1]} and {b.shape[1]}; "
                         "all ids of one batch must come from the same hash (e.g. [B, 2] uint32)")
    return jnp.all(a[:, None, :] == b[None, :, :], axis=-1)


def _check_inputs(query, positive, negatives, dims, query_ids, positive_ids, negative_ids, negatives_mask):
    if query.ndim != 2 or positive.shape != query.shape:
        raise ValueError(f"matryoshka_nce: query and positive must both be [B, D]; got {query.shape} "
                         f"and {positive.shape}")
    b, d = query.shape
    if negatives is not None:
        if negatives.ndim != 3 or negatives.shape[0] != b or negatives.shape[2] != d:
            raise ValueError(f"matryoshka_nce: negatives must be [B, K, D] = [{b}, K, {d}]; got "
                             f"{negatives.shape}")
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not 0 < dim <= d:
            raise ValueError(f"matryoshka_nce: MRL dim {dim!r} is not an integer in [1, {d}] (the "
                             "embedding width); fix loss.dims")
    for name, ids in (("query_ids", query_ids), ("positive_ids", positive_ids)):
        if ids is not None and (ids.ndim not in (1, 2) or ids.shape[0] != b):
            raise ValueError(f"matryoshka_nce: {name} must be [B] or [B, W] with B = {b}; got {ids.shape}")
    if negatives is None:
        if negative_ids is not None or negatives_mask is not None:
            raise ValueError("matryoshka_nce: negative_ids / negatives_mask given without negatives")
        return
    k = negatives.shape[1]
    if negative_ids is not None and (negative_ids.ndim not in (2, 3) or negative_ids.shape[:2] != (b, k)):
        raise ValueError(f"matryoshka_nce: negative_ids must be [B, K] or [B, K, W] = [{b}, {k}, ...]; "
                         f"got {negative_ids.shape}")
    if negatives_mask is not None and negatives_mask.shape != (b, k):
        raise ValueError(f"matryoshka_nce: negatives_mask must be [B, K] = [{b}, {k}]; got "
                         f"{negatives_mask.shape}")


def _row_nce(logits, keep_others, positive_logit, keep_positive: bool):
    """Per-row `-log softmax` of the positive over its kept competitors (and itself unless literal).

    Computed relative to the positive so that small losses keep their precision in float32:
    `log(1 + sum_j exp(x_j))` via `log1p`, where `x_j` is a competitor's margin over the positive.
    A row with nothing in its denominator (literal mask only) gives 0.
    """
    x = jnp.where(keep_others, logits - positive_logit[:, None], _MASKED)
    top = jnp.max(x, axis=-1)
    if keep_positive:
        m = jax.lax.stop_gradient(jnp.maximum(top, 0.0))
        rest = jnp.sum(jnp.exp(x - m[:, None]), axis=-1)
        return m + jnp.log1p(jnp.expm1(-m) + rest)
    m = jax.lax.stop_gradient(top)
    rest = jnp.sum(jnp.exp(x - m[:, None]), axis=-1)
    return jnp.where(jnp.any(keep_others, axis=-1), m + jnp.log(jnp.maximum(rest, 1e-30)), 0.0)


def _top1(logits, keep_others, positive_logit):
    """1.0 where the positive beats every other kept candidate."""
    best_other = jnp.max(jnp.where(keep_others, logits, _MASKED), axis=-1)
    return (positive_logit > best_other).astype(jnp.float32)


def _spread_out(x):
    """`1/(B(B-1)) sum_{i != j} (x_i . x_j)^2` on unit rows (EmbeddingGemma's regulariser)."""
    b = x.shape[0]
    if b < 2:
        return jnp.zeros((), jnp.float32)
    gram = x @ x.T
    off = 1.0 - jnp.eye(b, dtype=x.dtype)
    return jnp.sum(jnp.square(gram) * off) / (b * (b - 1))


def _masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class _Masks(NamedTuple):
    """Which logits each row keeps (independent of the MRL dim): in-batch columns `p_j`, hard
    negatives (`[B, K]`, or `[B, B*K]` with global hard negatives) and the row's own negatives."""
    inbatch: jax.Array
    hard: jax.Array | None
    own_hard: jax.Array | None


def _check_options(dims, dim_weights, temperature, mask_duplicates, query_ids, positive_ids, negatives,
                   negative_ids) -> tuple[float, ...]:
    """The dim weights (one per dim); raises on options that cannot work, naming the fix."""
    if dim_weights is None or len(dim_weights) == 0:
        dim_weights = (1.0,) * len(dims)
    if len(dim_weights) != len(dims):
        raise ValueError(f"matryoshka_nce: {len(dim_weights)} dim_weights for {len(dims)} dims {dims}; "
                         "give one weight per dim or none")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"matryoshka_nce: temperature must be > 0, got {temperature}")
    if mask_duplicates:
        needed = {"query_ids": query_ids, "positive_ids": positive_ids}
        if negatives is not None and negatives.shape[1] > 0:
            needed["negative_ids"] = negative_ids
        missing = [name for name, ids in needed.items() if ids is None]
        if missing:
            raise ValueError(f"matryoshka_nce: mask_duplicates=True needs the text ids {', '.join(missing)} to "
                             "tell duplicate texts apart; pass them (the data pipeline's *_hash entries) or "
                             "set mask_duplicates=False (--config.loss.mask_duplicates=false)")
    return tuple(dim_weights)


def _identity_masks(b: int, k: int, query_ids, positive_ids, negative_ids, negatives_mask, *,
                    mask_duplicates: bool, global_hard_negatives: bool) -> _Masks:
    """The text-identity masks of the module docstring (`k` = 0: no hard negatives)."""
    eye = jnp.eye(b, dtype=bool)
    use_q = mask_duplicates and query_ids is not None
    use_p = mask_duplicates and positive_ids is not None
    same_q = ids_equal(query_ids, query_ids) | eye if use_q else eye
    same_p = ids_equal(positive_ids, positive_ids) | eye if use_p else eye
    duplicate = (same_q | same_p) & ~eye
    keep_inbatch = ~duplicate & ~eye                       # columns p_j, j != i
    if not k:
        return _Masks(keep_inbatch, None, None)
    valid = jnp.ones((b, k), bool) if negatives_mask is None else negatives_mask.astype(bool)
    if mask_duplicates and negative_ids is not None and positive_ids is not None:
        # neg_is_pos[j, k, m]: negative (j, k) has the text of positive m.
        neg_is_pos = ids_equal(negative_ids.reshape((b * k,) + negative_ids.shape[2:]),
                               positive_ids).reshape(b, k, b)
        same_qf = same_q.astype(jnp.float32)
        if global_hard_negatives:
            # false[i, j, k]: n_jk is a positive of some row with q_i's text.
            false_neg = jnp.einsum("im,jkm->ijk", same_qf, neg_is_pos.astype(jnp.float32)) > 0
        else:
            false_neg = jnp.einsum("im,ikm->ik", same_qf, neg_is_pos.astype(jnp.float32)) > 0
    else:
        false_neg = jnp.zeros((b, b, k) if global_hard_negatives else (b, k), bool)
    if global_hard_negatives:
        keep_qn = (valid[None, :, :] & ~false_neg).reshape(b, b * k)
        own_keep = jnp.einsum("iik->ik", (valid[None, :, :] & ~false_neg).astype(jnp.int32)) > 0
    else:
        keep_qn = valid & ~false_neg
        own_keep = keep_qn
    return _Masks(keep_inbatch, keep_qn, own_keep)


def _dim_loss(query, positive, negatives, dim: int, masks: _Masks, *, temperature, global_hard_negatives,
              literal_mask, same_tower, symmetric, hardness_alpha, spread_out_weight, summary: bool):
    """`(loss, metrics)` at one MRL prefix `dim` (float32 inputs); `summary`: also the largest dim's
    `accuracy`, `pos_sim`, `neg_sim` and `hard_neg_sim`."""
    b = query.shape[0]
    q = l2_normalize(query[:, :dim])
    p = l2_normalize(positive[:, :dim])
    sim_qp = q @ p.T
    logits_qp = sim_qp / temperature
    pos_logit = jnp.diagonal(logits_qp)
    cols, keeps_other = [logits_qp], [masks.inbatch]
    if negatives is not None:
        k = negatives.shape[1]
        n = l2_normalize(negatives[:, :, :dim])
        if global_hard_negatives:
            sim_qn = jnp.einsum("id,jkd->ijk", q, n).reshape(b, b * k)
        else:
            sim_qn = jnp.einsum("id,ikd->ik", q, n)
        logits_qn = sim_qn / temperature
        if hardness_alpha:
            logits_qn = logits_qn + hardness_alpha * jax.lax.stop_gradient(sim_qn)
        cols.append(logits_qn)
        keeps_other.append(masks.hard)
    if same_tower:
        logits_qq = (q @ q.T) / temperature
        cols.append(logits_qq)
        keeps_other.append(masks.inbatch)
    logits = jnp.concatenate(cols, axis=1)
    keep_other = jnp.concatenate(keeps_other, axis=1)
    nce = jnp.mean(_row_nce(logits, keep_other, pos_logit, not literal_mask))
    if symmetric:
        nce = nce + jnp.mean(_row_nce(logits_qp.T, masks.inbatch.T, pos_logit, not literal_mask))
    loss = nce
    metrics = {f"loss_d{dim}": nce, f"accuracy_d{dim}": jnp.mean(_top1(logits, keep_other, pos_logit))}
    if spread_out_weight:
        spread = _spread_out(q) + _spread_out(p)
        metrics[f"spread_d{dim}"] = spread
        loss = loss + spread_out_weight * spread
    if summary:
        metrics["accuracy"] = metrics[f"accuracy_d{dim}"]
        metrics["pos_sim"] = jnp.mean(jnp.diagonal(sim_qp))
        metrics["neg_sim"] = _masked_mean(sim_qp, masks.inbatch)
        if negatives is not None:
            own_sim = jnp.einsum("id,ikd->ik", q, n)
            metrics["hard_neg_sim"] = _masked_mean(own_sim, masks.own_hard)
    return loss, metrics


def matryoshka_nce(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None = None,
    query_ids: jax.Array | None = None,
    positive_ids: jax.Array | None = None,
    negative_ids: jax.Array | None = None,
    negatives_mask: jax.Array | None = None,
    *,
    dims: Sequence[int] = (),
    dim_weights: Sequence[float] = (),
    temperature: float = 0.05,
    global_hard_negatives: bool = False,
    mask_duplicates: bool = True,
    literal_mask: bool = False,
    same_tower: bool = False,
    symmetric: bool = False,
    hardness_alpha: float = 0.0,
    spread_out_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Matryoshka NCE over the (global) batch; see the module docstring for the masking rules.

    The keyword-only arguments are the loss options: the train config's `loss` entry holds
    exactly them, with these defaults, and the train step passes them as `**config.loss`.

    Args:
      query, positive: `[B, D]` raw (un-normalised) embeddings; row i of each is a pair.
      negatives: `[B, K, D]` raw hard-negative embeddings, or None.
      dims: MRL prefix sizes; each prefix is L2-renormalised before the cosine; empty: the
        full width D only (the train step passes the model's `mrl_dims` when `loss.dims` is empty).
      temperature: logits are `cos / temperature`.
      query_ids, positive_ids, negative_ids: text-identity hashes `[B]` / `[B, W]`
        (`[B, K]` / `[B, K, W]` for negatives); equal ids mean the same text.
      negatives_mask: `[B, K]` bool, True where a hard-negative slot holds a real negative.
      dim_weights: weight of each dim's loss (empty: 1 each); the total is the weighted sum.
      global_hard_negatives: every row's hard negatives are negatives for every row
        (t5x_retrieval's `[B, B * (1 + K)]` logits) instead of only the row's own.
      mask_duplicates: apply the text-identity masks; needs `query_ids`, `positive_ids` and,
        with hard negatives, `negative_ids` (a ValueError otherwise).
      literal_mask: also drop the row's own positive from the denominator (the papers' formula).
      same_tower: add the other queries as negatives of each query (Gecko).
      symmetric: add the document-to-query term over the in-batch columns (t5x_retrieval).
      hardness_alpha: add `alpha * stop_gradient(cos(q_i, n))` to every hard-negative logit
        (EmbeddingGemma, alpha = 5); 0 turns it off.
      spread_out_weight: weight of the spread-out regulariser, added per dim to that dim's loss.

    Returns:
      `(loss, metrics)`: scalar float32 loss; metrics hold `loss_d{d}`, `accuracy_d{d}`
      (top-1 of the positive among the row's kept candidates), `spread_d{d}` when
      regularised, and at the largest dim `accuracy`, `pos_sim`, `neg_sim` (kept
      in-batch columns) and `hard_neg_sim` (kept hard negatives).
    """
    dims = tuple(dims) or (query.shape[-1],)
    _check_inputs(query, positive, negatives, dims, query_ids, positive_ids, negative_ids, negatives_mask)
    dim_weights = _check_options(dims, dim_weights, temperature, mask_duplicates, query_ids, positive_ids,
                                 negatives, negative_ids)
    # Logits and softmax in float32 whatever the compute dtype of the encoder.
    query = query.astype(jnp.float32)
    positive = positive.astype(jnp.float32)
    if negatives is not None and negatives.shape[1] > 0:
        negatives = negatives.astype(jnp.float32)
    else:
        negatives = None
    masks = _identity_masks(query.shape[0], 0 if negatives is None else negatives.shape[1], query_ids,
                            positive_ids, negative_ids, negatives_mask, mask_duplicates=mask_duplicates,
                            global_hard_negatives=global_hard_negatives)
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    top_dim = int(max(dims))
    for dim, weight in zip(dims, dim_weights):
        dim_loss, dim_metrics = _dim_loss(
            query, positive, negatives, int(dim), masks, temperature=temperature,
            global_hard_negatives=global_hard_negatives, literal_mask=literal_mask, same_tower=same_tower,
            symmetric=symmetric, hardness_alpha=hardness_alpha, spread_out_weight=spread_out_weight,
            summary=int(dim) == top_dim)
        metrics.update(dim_metrics)
        total = total + weight * dim_loss
    metrics["loss"] = total
    return total, metrics


# ---- distillation from a teacher embedder -------------------------------------------------------
#
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
    terms = {"distill_query": _masked_mean(_match(query, teacher_query, projection, distill_embedding_metric), rows),
             "distill_positive": _masked_mean(_match(positive, teacher_positive, projection,
                                                     distill_embedding_metric), rows)}
    total = w_q * terms["distill_query"] + w_p * terms["distill_positive"]
    if negatives is not None and negatives.shape[1] > 0 and w_n:
        if teacher_negatives is None:
            raise ValueError("embedding_distillation: the batch has hard negatives but no teacher negatives; "
                             "set distill_term_weights' third entry to 0 or store the teacher's negatives")
        _check_distill_inputs("negatives", negatives, teacher_negatives, projection)
        per_slot = _match(negatives, teacher_negatives, projection, distill_embedding_metric)
        keep = jnp.ones(per_slot.shape, bool) if negatives_mask is None else negatives_mask.astype(bool)
        terms["distill_negative"] = _masked_mean(per_slot, keep & rows[:, None])
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
    masks = _identity_masks(b, k, query_ids, positive_ids, negative_ids if k else None,
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
    x = jnp.where(keep, logits, _MASKED)
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
        kl = _masked_mean(jnp.sum(p_t * (log_t - log_s), axis=-1), rows)
        metrics[f"distill_kl_d{dim}"] = kl
        total = total + weight * kl
    loss = distill_score_weight * total
    metrics["distill_score"] = loss
    return loss, metrics


# Every loss function of the train step; `train.config.loss_defaults()` builds `config.loss` from
# their keyword-only arguments (an option several of them take, like `dims`, is shared).
LOSS_FUNCTIONS = (matryoshka_nce, embedding_distillation, teacher_candidate_scores, score_distillation)


def options_for(fn, options: dict) -> dict:
    """The entries of `options` that loss function `fn` takes as keyword-only arguments."""
    names = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {k: v for k, v in options.items() if k in names}
