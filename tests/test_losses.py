"""Matryoshka NCE against an independent NumPy reference written with plain Python loops."""
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder.losses import matryoshka_nce
from embedder.train.loss_options import LOSS_FUNCTIONS, options_for
from embedder.train.config import base_config, loss_options

RTOL = 1e-5


# ---------------------------------------------------------------- reference


def _same(a, b):
    return a is not None and b is not None and list(np.ravel(a)) == list(np.ravel(b))


def _unit(v):
    norm = math.sqrt(sum(float(x) * float(x) for x in v))
    return [float(x) / norm for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _neg_log_softmax(pos, terms):
    if not terms:
        return 0.0
    m = max(terms)
    return -(pos - (m + math.log(sum(math.exp(t - m) for t in terms))))


def reference_loss(q, p, n=None, *, dims, temperature, qid=None, pid=None, nid=None, nmask=None,
                   dim_weights=None, global_hard_negatives=False, mask_duplicates=True, literal_mask=False,
                   same_tower=False, symmetric=False, hardness_alpha=0.0, spread_out_weight=0.0,
                   frozen=None):
    """method.md's loss row by row. `frozen` = (q, n) arrays for the stop-gradient hardness term."""
    q = np.asarray(q, np.float64)
    p = np.asarray(p, np.float64)
    B = q.shape[0]
    K = 0 if n is None else n.shape[1]
    weights = dim_weights or [1.0] * len(dims)

    def same_query(i, j):
        return i == j or (mask_duplicates and _same(qid[i] if qid is not None else None,
                                                     qid[j] if qid is not None else None))

    def same_pos(i, j):
        return i == j or (mask_duplicates and _same(pid[i] if pid is not None else None,
                                                     pid[j] if pid is not None else None))

    def duplicate(i, j):
        return same_query(i, j) or same_pos(i, j)

    def false_negative(i, j, k):
        if not mask_duplicates or nid is None or pid is None:
            return False
        return any(same_query(i, m) and _same(nid[j][k], pid[m]) for m in range(B))

    total = 0.0
    per_dim = {}
    for d, w in zip(dims, weights):
        qs = [_unit(q[i, :d]) for i in range(B)]
        ps = [_unit(p[i, :d]) for i in range(B)]
        ns = [[_unit(n[j, k, :d]) for k in range(K)] for j in range(B)]
        if frozen is not None:
            fq = [_unit(frozen[0][i, :d]) for i in range(B)]
            fn = [[_unit(frozen[1][j, k, :d]) for k in range(K)] for j in range(B)]
        else:
            fq, fn = qs, ns
        rows = []
        for i in range(B):
            pos = _dot(qs[i], ps[i]) / temperature
            terms = [] if literal_mask else [pos]
            for j in range(B):
                if j != i and not duplicate(i, j):
                    terms.append(_dot(qs[i], ps[j]) / temperature)
            for j in (range(B) if global_hard_negatives else [i]):
                for k in range(K):
                    if nmask is not None and not nmask[j][k]:
                        continue
                    if false_negative(i, j, k):
                        continue
                    terms.append(_dot(qs[i], ns[j][k]) / temperature + hardness_alpha * _dot(fq[i], fn[j][k]))
            if same_tower:
                for j in range(B):
                    if j != i and not duplicate(i, j):
                        terms.append(_dot(qs[i], qs[j]) / temperature)
            rows.append(_neg_log_softmax(pos, terms))
        loss = sum(rows) / B
        if symmetric:
            rows = []
            for i in range(B):
                pos = _dot(ps[i], qs[i]) / temperature
                terms = [] if literal_mask else [pos]
                for j in range(B):
                    if j != i and not duplicate(i, j):
                        terms.append(_dot(ps[i], qs[j]) / temperature)
                rows.append(_neg_log_softmax(pos, terms))
            loss += sum(rows) / B
        per_dim[d] = loss
        if spread_out_weight:
            spread = 0.0
            for vecs in (qs, ps):
                for i in range(B):
                    for j in range(B):
                        if i != j:
                            spread += _dot(vecs[i], vecs[j]) ** 2 / (B * (B - 1))
            loss += spread_out_weight * spread
        total += w * loss
    return total, per_dim


def _call(q, p, n=None, *, qid=None, pid=None, nid=None, nmask=None, **opts):
    # Eager: each primitive compiles once per shape and is reused by later calls,
    # far cheaper over the whole file than one jit compile per option set.
    fn = (lambda *arrays: matryoshka_nce(*arrays[:3], query_ids=arrays[3], positive_ids=arrays[4],
                                                negative_ids=arrays[5], negatives_mask=arrays[6], **opts))
    as_j = lambda x: None if x is None else jnp.asarray(x)
    return fn(as_j(q), as_j(p), as_j(n), as_j(qid), as_j(pid), as_j(nid), as_j(nmask))


def _rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


# ---------------------------------------------------------------- data


def random_batch(seed, B=8, D=32, K=3, with_negatives=True, duplicates=True):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, D)).astype(np.float32)
    p = (q + 0.8 * rng.normal(size=(B, D))).astype(np.float32)
    n = (q[:, None, :] + 1.0 * rng.normal(size=(B, K, D))).astype(np.float32) if with_negatives else None
    qid = np.arange(B, dtype=np.uint32) + 1000
    pid = np.arange(B, dtype=np.uint32) + 2000
    if duplicates:
        qid[3] = qid[1]        # duplicate query text
        pid[5] = pid[2]        # duplicate positive text
    nid = None
    nmask = None
    if with_negatives:
        nid = (np.arange(B * K, dtype=np.uint32).reshape(B, K) + 3000)
        if duplicates:
            nid[0, 1] = pid[0]     # false negative: own positive
            nid[4, 0] = pid[6]     # another row's positive (a false negative under global HN for row 6)
            nid[1, 2] = pid[3]     # positive of a duplicate query (rows 1 and 3 share the query)
        nmask = rng.random((B, K)) > 0.3
        nmask[0] = True
        nmask[7] = False           # a row with no hard negatives at all
    return dict(q=q, p=p, n=n, qid=qid, pid=pid, nid=nid, nmask=nmask)


def classification_batch(seed, B=16, D=24, labels=3):
    """Each positive is one of `labels` label texts; the hard negative is another label."""
    rng = np.random.default_rng(seed)
    label_vecs = rng.normal(size=(labels, D)).astype(np.float32)
    y = rng.integers(0, labels, size=B)
    y[:labels] = np.arange(labels)
    q = (label_vecs[y] + 1.5 * rng.normal(size=(B, D))).astype(np.float32)
    # the model's positive embeddings of identical texts are identical
    p = label_vecs[y].copy()
    wrong = (y + 1 + rng.integers(0, labels - 1, size=B)) % labels
    n = label_vecs[wrong][:, None, :].copy()
    hashes = np.array([[11, 1], [22, 2], [33, 3]], np.uint32)  # [labels, 2] like the pipeline's uint32 pairs
    qid = np.stack([np.arange(B, dtype=np.uint32) + 100, np.zeros(B, np.uint32)], axis=1)
    return dict(q=q, p=p, n=n, qid=qid, pid=hashes[y], nid=hashes[wrong][:, None, :], nmask=np.ones((B, 1), bool))


def _args(batch):
    return {k: batch[k] for k in ("qid", "pid", "nid", "nmask")}


def _check(batch, **opts):
    got, metrics = _call(batch["q"], batch["p"], batch["n"], **_args(batch), **opts)
    want, per_dim = reference_loss(batch["q"], batch["p"], batch["n"], **_args(batch), **opts)
    assert got.dtype == jnp.float32
    assert _rel(got, want) <= RTOL, (float(got), want)
    for d, v in per_dim.items():
        assert _rel(metrics[f"loss_d{d}"], v) <= RTOL, (d, float(metrics[f"loss_d{d}"]), v)
    return got, metrics


# ---------------------------------------------------------------- tests

DIMS = (8, 16, 32)


def test_in_batch_only_several_dims():
    b = random_batch(0, with_negatives=False, duplicates=False)
    _check(b, dims=DIMS, temperature=0.05)
    _check(b, dims=(32,), temperature=1.0)


def test_hard_negatives_variable_count_and_duplicates():
    _check(random_batch(1), dims=DIMS, temperature=0.05)


def test_global_hard_negatives():
    _check(random_batch(2), dims=DIMS, temperature=0.07, global_hard_negatives=True)


OPTION_SETS = [
    dict(literal_mask=True),
    dict(same_tower=True),
    dict(symmetric=True),
    dict(hardness_alpha=5.0),
    dict(spread_out_weight=0.3),
    dict(dim_weights=(0.5, 2.0, 1.0)),
    dict(mask_duplicates=False),
    dict(global_hard_negatives=True, hardness_alpha=5.0, same_tower=True, symmetric=True,
         spread_out_weight=0.1, dim_weights=(1.0, 0.5, 0.25)),
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(sorted(o)))
def test_each_option(opts):
    _check(random_batch(3), dims=DIMS, temperature=0.05, **opts)


@pytest.mark.parametrize("global_hn", [False, True])
def test_classification_style_batch(global_hn):
    b = classification_batch(4)
    got, _ = _check(b, dims=(8, 24), temperature=0.05, global_hard_negatives=global_hn)
    # Without the duplicate mask the rows sharing a label fight their own positive: a larger loss.
    unmasked, _ = _call(b["q"], b["p"], b["n"], **_args(b), dims=(8, 24), temperature=0.05,
                        global_hard_negatives=global_hn, mask_duplicates=False)
    assert float(unmasked) > float(got) + 1.0


def test_classification_literal_mask_and_empty_rows():
    b = classification_batch(5)
    _check(b, dims=(24,), temperature=0.05, literal_mask=True, global_hard_negatives=True)
    # Every positive is the same label and no hard negatives: every row's denominator is empty.
    b["pid"][:] = b["pid"][0]
    b["p"][:] = b["p"][0]
    got, _ = _call(b["q"], b["p"], None, qid=b["qid"], pid=b["pid"], dims=(24,), temperature=0.05,
                   literal_mask=True)
    want, _ = reference_loss(b["q"], b["p"], None, qid=b["qid"], pid=b["pid"], dims=(24,), temperature=0.05,
                             literal_mask=True)
    assert want == 0.0 and float(got) == 0.0


def test_id_width_one_equals_flat_ids():
    b = random_batch(6)
    flat, _ = _call(b["q"], b["p"], b["n"], **_args(b), dims=DIMS, temperature=0.05)
    wide = dict(_args(b), qid=b["qid"][:, None], pid=b["pid"][:, None], nid=b["nid"][:, :, None])
    got, _ = _call(b["q"], b["p"], b["n"], **wide, dims=DIMS, temperature=0.05)
    assert float(got) == pytest.approx(float(flat), rel=1e-7)


def test_bfloat16_inputs_give_float32_loss():
    b = random_batch(7)
    bf = {k: (jnp.asarray(b[k]).astype(jnp.bfloat16) if k in "qpn" else b[k]) for k in b}
    got, _ = _call(bf["q"], bf["p"], bf["n"], **_args(b), dims=DIMS, temperature=0.05)
    rounded = {k: np.asarray(bf[k].astype(jnp.float32)) for k in "qpn"}
    want, _ = reference_loss(rounded["q"], rounded["p"], rounded["n"], **_args(b), dims=DIMS, temperature=0.05)
    assert got.dtype == jnp.float32
    assert _rel(got, want) <= RTOL


def test_metrics_against_loops():
    b = random_batch(8)
    _, m = _call(b["q"], b["p"], b["n"], **_args(b), dims=(16, 32), temperature=0.05)
    B, K = b["q"].shape[0], b["n"].shape[1]
    qs = [_unit(b["q"][i]) for i in range(B)]
    ps = [_unit(b["p"][i]) for i in range(B)]
    ns = [[_unit(b["n"][i, k]) for k in range(K)] for i in range(B)]
    dup = lambda i, j: b["qid"][i] == b["qid"][j] or b["pid"][i] == b["pid"][j]
    correct, negs, hard = 0, [], []
    for i in range(B):
        pos = _dot(qs[i], ps[i])
        others = [_dot(qs[i], ps[j]) for j in range(B) if j != i and not dup(i, j)]
        negs += others
        own = [_dot(qs[i], ns[i][k]) for k in range(K) if b["nmask"][i][k] and b["nid"][i][k] != b["pid"][i]
               and not (i in (1, 3) and b["nid"][i][k] in (b["pid"][1], b["pid"][3]))]
        hard += own
        correct += pos > max(others + own)
    assert float(m["accuracy"]) == pytest.approx(correct / B)
    assert float(m["accuracy_d32"]) == pytest.approx(correct / B)
    assert float(m["pos_sim"]) == pytest.approx(sum(_dot(qs[i], ps[i]) for i in range(B)) / B, rel=1e-5)
    assert float(m["neg_sim"]) == pytest.approx(sum(negs) / len(negs), rel=1e-5)
    assert float(m["hard_neg_sim"]) == pytest.approx(sum(hard) / len(hard), rel=1e-5)


def test_gradients_match_finite_differences_with_stop_gradient_hardness():
    b = random_batch(9, B=8, D=4, K=3)
    opts = dict(dims=(2, 4), temperature=0.5, hardness_alpha=2.0, global_hard_negatives=True,
                same_tower=True, symmetric=True, spread_out_weight=0.2)
    ids = {k: jnp.asarray(v) for k, v in _args(b).items()}
    fn = lambda q, p, n: matryoshka_nce(q, p, n, query_ids=ids["qid"], positive_ids=ids["pid"],
                                        negative_ids=ids["nid"], negatives_mask=ids["nmask"], **opts)[0]
    grads = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(jnp.asarray(b["q"]), jnp.asarray(b["p"]), jnp.asarray(b["n"]))
    frozen = (b["q"].astype(np.float64), b["n"].astype(np.float64))
    base = {k: b[k].astype(np.float64) for k in "qpn"}
    eps = 1e-6
    for idx, name in enumerate("qpn"):
        arr = base[name]
        for flat in range(idx, arr.size, 7):
            pos = np.unravel_index(flat, arr.shape)
            plus, minus = dict(base), dict(base)
            plus[name] = arr.copy()
            plus[name][pos] += eps
            minus[name] = arr.copy()
            minus[name][pos] -= eps
            fd = (reference_loss(plus["q"], plus["p"], plus["n"], **_args(b), frozen=frozen, **opts)[0]
                  - reference_loss(minus["q"], minus["p"], minus["n"], **_args(b), frozen=frozen, **opts)[0]) / (2 * eps)
            assert float(grads[idx][pos]) == pytest.approx(fd, rel=2e-3, abs=2e-4), (name, pos)


def test_jit_matches_eager():
    b = random_batch(10)
    eager, _ = _call(b["q"], b["p"], b["n"], **_args(b), dims=DIMS, temperature=0.05, global_hard_negatives=True)
    jitted = jax.jit(lambda q, p, n: _call(q, p, n, **_args(b), dims=DIMS, temperature=0.05,
                                            global_hard_negatives=True)[0])(b["q"], b["p"], b["n"])
    assert float(jitted) == pytest.approx(float(eager), rel=1e-6)


def test_bad_inputs_explain_the_fix():
    q = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match=r"MRL dim 16"):
        matryoshka_nce(q, q, dims=(16,), temperature=0.05)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        matryoshka_nce(q, jnp.zeros((3, 8)), dims=(8,), temperature=0.05)
    with pytest.raises(ValueError, match=r"negatives must be \[B, K, D\]"):
        matryoshka_nce(q, q, jnp.zeros((4, 8)), dims=(8,), temperature=0.05)
    with pytest.raises(ValueError, match="temperature"):
        matryoshka_nce(q, q, dims=(8,), temperature=0.0)
    with pytest.raises(ValueError, match="dim_weights"):
        matryoshka_nce(q, q, dims=(8, 4), temperature=0.05, dim_weights=(1.0,))
    with pytest.raises(ValueError, match="query_ids"):
        matryoshka_nce(q, q, dims=(8,), temperature=0.05, query_ids=jnp.zeros((3,)))


def test_options_from_config():
    """The train config's `loss` entry is the loss functions' keyword arguments (`matryoshka_nce`'s and the
    distillation losses'); each takes its own (`options_for`)."""
    cfg = base_config().loss
    cfg.update({"dims": (8, 32), "global_hard_negatives": True, "same_tower": True, "hardness_alpha": 5.0})
    b = random_batch(11)
    want, _ = reference_loss(b["q"], b["p"], b["n"], **_args(b), dims=(8, 32), temperature=0.05,
                             global_hard_negatives=True, same_tower=True, hardness_alpha=5.0)
    for opts in (cfg, loss_options(cfg)):
        got, _ = _call(b["q"], b["p"], b["n"], **_args(b), **options_for(matryoshka_nce, dict(opts)))
        assert _rel(got, want) <= RTOL
    assert set(options_for(matryoshka_nce, dict(cfg))) == set(inspect.signature(matryoshka_nce).parameters) - {
        "query", "positive", "negatives", "query_ids", "positive_ids", "negative_ids", "negatives_mask"}
    keyword_only = {name for fn in LOSS_FUNCTIONS for name, prm in inspect.signature(fn).parameters.items()
                    if prm.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(cfg) == keyword_only
    with pytest.raises(ValueError, match=r"unknown loss option\(s\) \['temprature'\].*valid: .*'temperature'"):
        loss_options({"dims": (8,), "temprature": 0.1})


def test_empty_dims_is_the_full_width():
    b = random_batch(12)
    got, metrics = _call(b["q"], b["p"], b["n"], **_args(b))
    want, _ = reference_loss(b["q"], b["p"], b["n"], **_args(b), dims=(b["q"].shape[1],), temperature=0.05)
    assert _rel(got, want) <= RTOL and f"loss_d{b['q'].shape[1]}" in metrics


def test_duplicate_masking_without_text_ids_is_refused():
    """mask_duplicates needs the ids: the loss refuses rather than silently masking nothing."""
    b = random_batch(12)
    with pytest.raises(ValueError, match="query_ids, positive_ids"):
        matryoshka_nce(jnp.asarray(b["q"]), jnp.asarray(b["p"]), mask_duplicates=True)
    with pytest.raises(ValueError, match="negative_ids"):
        matryoshka_nce(jnp.asarray(b["q"]), jnp.asarray(b["p"]), jnp.asarray(b["n"]), query_ids=jnp.asarray(b["qid"]),
                       positive_ids=jnp.asarray(b["pid"]), mask_duplicates=True)
    loss, _ = matryoshka_nce(jnp.asarray(b["q"]), jnp.asarray(b["p"]), jnp.asarray(b["n"]), mask_duplicates=False)
    assert np.isfinite(float(loss))
