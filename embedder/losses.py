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

import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

# Logit given to masked entries: finite so that gradients through `where` stay
# finite, and so small that exp() underflows to exactly 0 in float32.
MASKED_LOGIT = -1e9


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
    x = jnp.where(keep_others, logits - positive_logit[:, None], MASKED_LOGIT)
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
    best_other = jnp.max(jnp.where(keep_others, logits, MASKED_LOGIT), axis=-1)
    return (positive_logit > best_other).astype(jnp.float32)


def _spread_out(x):
    """`1/(B(B-1)) sum_{i != j} (x_i . x_j)^2` on unit rows (EmbeddingGemma's regulariser)."""
    b = x.shape[0]
    if b < 2:
        return jnp.zeros((), jnp.float32)
    gram = x @ x.T
    off = 1.0 - jnp.eye(b, dtype=x.dtype)
    return jnp.sum(jnp.square(gram) * off) / (b * (b - 1))


def masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class Masks(NamedTuple):
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


def identity_masks(b: int, k: int, query_ids, positive_ids, negative_ids, negatives_mask, *,
                    mask_duplicates: bool, global_hard_negatives: bool) -> Masks:
    """The text-identity masks of the module docstring (`k` = 0: no hard negatives)."""
    eye = jnp.eye(b, dtype=bool)
    use_q = mask_duplicates and query_ids is not None
    use_p = mask_duplicates and positive_ids is not None
    same_q = ids_equal(query_ids, query_ids) | eye if use_q else eye
    same_p = ids_equal(positive_ids, positive_ids) | eye if use_p else eye
    duplicate = (same_q | same_p) & ~eye
    keep_inbatch = ~duplicate & ~eye                       # columns p_j, j != i
    if not k:
        return Masks(keep_inbatch, None, None)
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
    return Masks(keep_inbatch, keep_qn, own_keep)


def _dim_loss(query, positive, negatives, dim: int, masks: Masks, *, temperature, global_hard_negatives,
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
        metrics["neg_sim"] = masked_mean(sim_qp, masks.inbatch)
        if negatives is not None:
            own_sim = jnp.einsum("id,ikd->ik", q, n)
            metrics["hard_neg_sim"] = masked_mean(own_sim, masks.own_hard)
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
    masks = identity_masks(query.shape[0], 0 if negatives is None else negatives.shape[1], query_ids,
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
