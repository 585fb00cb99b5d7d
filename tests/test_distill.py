"""Distillation from a teacher: the losses against NumPy, the distilled step through the gradient
cache, the teacher pass (resume, refusal) and its signals joined to the right rows after shuffling,
packing and per-host slicing."""
import hashlib
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from embedder import sharding
from embedder.data.pipeline import make_train_iterator
from embedder.data.prompts import Prompts
from embedder.data.text_identity import text_ids
from embedder.distill.signals import SignalsError, TeacherSignals
from embedder.distill.teacher import run_teacher
from embedder.distill.losses import embedding_distillation, score_distillation, teacher_candidate_scores
from embedder.train.config import ConfigError, base_config, check_config, loss_defaults
from embedder.train.step import make_grad_fn
from test_train_step import StandInEncoder, make_batch, mesh_of


# ---- NumPy references ---------------------------------------------------------------------------

def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_embedding_distillation(q, p, n, tq, tp, tn, valid, w, metric, term_weights):
    def match(s, t):
        s = _unit(s)
        if w is not None:
            s = s @ w
        t = _unit(t)
        if metric == "l2":
            return ((s - t) ** 2).sum(-1)
        return 1 - (_unit(s) * t).sum(-1)
    lq, lp = match(q, tq).mean(), match(p, tp).mean()
    ln = (match(n, tn) * valid).sum() / max(valid.sum(), 1)
    return term_weights[0] * lq + term_weights[1] * lp + term_weights[2] * ln, (lq, lp, ln)


def np_log_softmax(x, keep):
    x = np.where(keep, x, -np.inf)
    m = x.max(-1, keepdims=True)
    out = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    return np.where(keep, out, 0.0)


def np_teacher_candidates(tq, tp, tn, qid, pid, nid, valid, in_batch=True):
    """[B, B+K] teacher cosines and kept candidates, from the masking rules written out row by row."""
    b, k = tn.shape[:2]
    scores = np.concatenate([_unit(tq) @ _unit(tp).T, np.einsum("id,ikd->ik", _unit(tq), _unit(tn))], 1)
    keep = np.zeros((b, b + k), bool)
    for i in range(b):
        for j in range(b):
            dup = qid[i] == qid[j] or pid[i] == pid[j]
            keep[i, j] = i == j or (in_batch and not dup)
        for kk in range(k):
            false = any(qid[m] == qid[i] and nid[i, kk] == pid[m] for m in range(b))
            keep[i, b + kk] = valid[i, kk] and not false
    return scores, keep


def np_score_distillation(q, p, n, t_scores, keep, dims, t_s, t_t, rows=None):
    rows = np.ones(len(q), bool) if rows is None else rows
    total, per = 0.0, []
    log_t = np_log_softmax(t_scores / t_t, keep)
    p_t = np.where(keep, np.exp(log_t), 0)
    for d in dims:
        qd, pd, nd = _unit(q[:, :d]), _unit(p[:, :d]), _unit(n[:, :, :d])
        s = np.concatenate([qd @ pd.T, np.einsum("id,ikd->ik", qd, nd)], 1)
        log_s = np_log_softmax(s / t_s, keep)
        kl = (p_t * (log_t - log_s)).sum(-1)[rows].mean()
        per.append(kl)
        total += kl
    return total, per


def _inputs(seed=0, b=6, k=3, d=8, dt=5):
    rng = np.random.default_rng(seed)
    q, p, n = rng.normal(size=(b, d)), rng.normal(size=(b, d)), rng.normal(size=(b, k, d))
    tq, tp, tn = rng.normal(size=(b, dt)), rng.normal(size=(b, dt)), rng.normal(size=(b, k, dt))
    valid = rng.random((b, k)) > 0.3
    qid, pid = np.arange(b), np.arange(b) + 100
    nid = np.arange(b * k).reshape(b, k) + 1000
    qid[4] = qid[0]                  # a duplicate query
    pid[2] = pid[1]                  # a duplicate positive
    nid[0, 1] = pid[4]               # a false negative (a positive of row 0's query text)
    return q, p, n, tq, tp, tn, valid, qid, pid, nid


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("project", [True, False])
def test_embedding_distillation_matches_numpy(metric, project):
    q, p, n, tq, tp, tn, valid, *_ = _inputs(dt=5 if project else 8)
    w = np.random.default_rng(1).normal(size=(8, 5)) if project else None
    weights = (1.0, 0.5, 2.0)
    want, (lq, lp, ln) = np_embedding_distillation(q, p, n, tq, tp, tn, valid, w, metric, weights)
    loss, m = embedding_distillation(*map(jnp.asarray, (q, p, n, tq, tp, tn, valid)),
                                     None if w is None else jnp.asarray(w), distill_embedding_weight=0.3,
                                     distill_embedding_metric=metric, distill_term_weights=weights)
    np.testing.assert_allclose(float(loss), 0.3 * want, rtol=1e-5)
    np.testing.assert_allclose([m["distill_query"], m["distill_positive"], m["distill_negative"]], [lq, lp, ln],
                               rtol=1e-5)


def test_rows_the_teacher_lacks_are_left_out_of_both_distillation_losses():
    """`rows_mask` 0 rows (a dataset with "distill": false): embedding matching equals NumPy on the kept
    rows alone, and the score KL is the mean over the kept rows of the full batch's per-row KL."""
    q, p, n, tq, tp, tn, valid, qid, pid, nid = _inputs(dt=5)
    rows = np.array([1, 0, 1, 1, 0, 1], bool)
    w = np.random.default_rng(1).normal(size=(8, 5))
    want, parts = np_embedding_distillation(q[rows], p[rows], n[rows], tq[rows], tp[rows], tn[rows], valid[rows], w,
                                            "cosine", (1.0, 1.0, 1.0))
    loss, m = embedding_distillation(*map(jnp.asarray, (q, p, n, tq, tp, tn, valid, w, rows)),
                                     distill_embedding_weight=1.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose([m["distill_query"], m["distill_positive"], m["distill_negative"]], parts, rtol=1e-5)
    scores, keep = teacher_candidate_scores(jnp.asarray(tq), jnp.asarray(tp), jnp.asarray(tn), None, jnp.asarray(qid),
                                            jnp.asarray(pid), jnp.asarray(nid), jnp.asarray(valid))
    want, _ = np_score_distillation(q, p, n, np.asarray(scores), np.asarray(keep), (8,), 0.05, 0.05, rows)
    loss, _ = score_distillation(jnp.asarray(q), jnp.asarray(p), jnp.asarray(n), scores, keep, jnp.asarray(rows),
                                 distill_score_weight=1.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    unmasked, _ = score_distillation(jnp.asarray(q), jnp.asarray(p), jnp.asarray(n), scores, keep,
                                     distill_score_weight=1.0)
    assert abs(float(unmasked) - want) > 1e-4   # the mask changes the result on these inputs
    with pytest.raises(ValueError, match=r"rows_mask \(5,\) is not \[B\] = \[6\]"):
        score_distillation(jnp.asarray(q), jnp.asarray(p), jnp.asarray(n), scores, keep, jnp.ones(5, bool),
                           distill_score_weight=1.0)


def test_embedding_distillation_of_other_width_needs_a_projection():
    q, p, n, tq, tp, tn, valid, *_ = _inputs(dt=5)
    with pytest.raises(ValueError, match="projection"):
        embedding_distillation(q, p, n, tq, tp, tn, valid, distill_embedding_weight=1.0)


@pytest.mark.parametrize("in_batch", [True, False])
def test_score_distillation_from_teacher_embeddings_matches_numpy(in_batch):
    q, p, n, tq, tp, tn, valid, qid, pid, nid = _inputs()
    scores, keep = teacher_candidate_scores(jnp.asarray(tq), jnp.asarray(tp), jnp.asarray(tn), None,
                                            jnp.asarray(qid), jnp.asarray(pid), jnp.asarray(nid),
                                            jnp.asarray(valid), distill_in_batch=in_batch)
    want_scores, want_keep = np_teacher_candidates(tq, tp, tn, qid, pid, nid, valid, in_batch)
    np.testing.assert_array_equal(np.asarray(keep), want_keep)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-6)
    dims = (8, 4)
    want, per = np_score_distillation(q, p, n, want_scores, want_keep, dims, 0.1, 0.2)
    loss, m = score_distillation(jnp.asarray(q), jnp.asarray(p), jnp.asarray(n), scores, keep, dims=dims,
                                 distill_score_weight=2.0, distill_student_temperature=0.1,
                                 distill_teacher_temperature=0.2)
    np.testing.assert_allclose(float(loss), 2.0 * want, rtol=1e-5)
    np.testing.assert_allclose([m["distill_kl_d8"], m["distill_kl_d4"]], per, rtol=1e-5)
    assert want > 1e-3


def test_score_distillation_from_stored_scores_uses_each_rows_own_candidates():
    q, p, n, tq, tp, tn, valid, qid, pid, nid = _inputs()
    full, _ = np_teacher_candidates(tq, tp, tn, qid, pid, nid, valid)
    b = q.shape[0]
    stored = np.concatenate([np.diagonal(full[:, :b])[:, None], full[:, b:]], 1)   # [B, 1 + K]
    scores, keep = teacher_candidate_scores(None, None, None, jnp.asarray(stored), jnp.asarray(qid),
                                            jnp.asarray(pid), jnp.asarray(nid), jnp.asarray(valid))
    _, want_keep = np_teacher_candidates(tq, tp, tn, qid, pid, nid, valid, in_batch=False)
    np.testing.assert_array_equal(np.asarray(keep), want_keep)
    np.testing.assert_allclose(np.asarray(scores)[want_keep], full[want_keep], rtol=1e-6)
    want, _ = np_score_distillation(q, p, n, full, want_keep, (8,), 0.05, 0.05)
    loss, _ = score_distillation(jnp.asarray(q), jnp.asarray(p), jnp.asarray(n), scores, keep,
                                 distill_score_weight=1.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_loss_options_include_distillation_and_configs_check_the_teacher():
    defaults = loss_defaults()
    assert defaults["distill_embedding_weight"] == 0.0 and defaults["distill_score_weight"] == 0.0
    assert defaults["dims"] == () and defaults["temperature"] == 0.05
    c = base_config()
    c.loss.distill_embedding_weight = 1.0
    with pytest.raises(ConfigError, match="data.teacher"):
        check_config(c)
    c.loss.distill_embedding_weight = 0.0
    c.data.teacher = "/somewhere"
    with pytest.raises(ConfigError, match="no distillation loss"):
        check_config(c)


# ---- the distilled step through the gradient cache -----------------------------------------------

DISTILL_LOSS = {"dims": (16, 8), "temperature": 0.05, "distill_embedding_weight": 0.7,
                "distill_embedding_metric": "l2", "distill_score_weight": 0.5,
                "distill_teacher_temperature": 0.1}


def _with_teacher(batch, width, seed=5):
    rng = np.random.default_rng(seed)
    b, k = batch["negatives_valid"].shape
    out = dict(batch, teacher_query=_unit(rng.normal(size=(b, width))).astype(np.float32),
               teacher_positive=_unit(rng.normal(size=(b, width))).astype(np.float32),
               teacher_negative=_unit(rng.normal(size=(b, k, width))).astype(np.float32))
    return out


def _distilled_grads(mesh, batch, chunks, teacher_dim):
    from embedder.train.state import _boxed_init_fn
    model = StandInEncoder()
    params = nn.meta.unbox(jax.jit(_boxed_init_fn(model, batch["query_ids"].shape[1], teacher_dim))(
        jax.random.key(0)))
    grad_fn = make_grad_fn(model, DISTILL_LOSS, grad_cache_chunks=chunks)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        (loss, metrics), grads = jax.jit(grad_fn)(params, sharding.host_to_global(batch, mesh), jax.random.key(3))
    return float(loss), {k: float(v) for k, v in metrics.items()}, jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("teacher_dim", [0, 24], ids=["same_width", "projected"])
def test_distilled_gradient_cache_equals_full_batch(teacher_dim):
    mesh = mesh_of((2, 2, 2))
    batch = _with_teacher(make_batch(7, b=16, k=2), teacher_dim or 16)
    loss, metrics, grads = _distilled_grads(mesh, batch, 0, teacher_dim)
    c_loss, c_metrics, c_grads = _distilled_grads(mesh, batch, 4, teacher_dim)
    for key in ("distill_query", "distill_positive", "distill_negative", "distill_kl_d16", "distill_kl_d8", "nce"):
        assert key in metrics and metrics[key] > 0, key
    assert metrics["loss"] == pytest.approx(metrics["nce"] + metrics["distill_embedding"] + metrics["distill_score"],
                                            rel=1e-6)
    assert c_loss == pytest.approx(loss, rel=1e-6)
    for key in metrics:
        assert c_metrics[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
    assert ("teacher_projection" in grads) == bool(teacher_dim)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
    for (path, g), cg in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(c_grads)):
        np.testing.assert_allclose(cg, g, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    if teacher_dim:
        assert np.abs(grads["teacher_projection"]["projection"]["w"]).max() > 0


# ---- the teacher pass and the join ---------------------------------------------------------------

class HashTeacher:
    """A stand-in teacher of width 12: each (role, task or title, text) gets a fixed random unit vector."""
    name = "hash-teacher"
    embedding_dim = 12

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    @staticmethod
    def vector(role, context, text):
        seed = int.from_bytes(hashlib.blake2b(f"{role}|{context or ''}|{text}".encode(), digest_size=8).digest(), "big")
        return _unit(np.random.default_rng(seed).normal(size=12)).astype(np.float32)

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None, max_length=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("stopped")
        ctx = [task] * len(texts) if role == "query" else (titles or [None] * len(texts))
        return np.stack([self.vector(role, c, t) for c, t in zip(ctx, texts)])


def _records(path, n=40):
    with open(path, "w") as f:
        for i in range(n):
            rec = {"query": f"q {i % 31}", "positive": f"doc {i}", "negatives": [f"neg {i} {j}" for j in range(i % 3)]}
            if i % 4 == 0:
                rec["title"] = f"title {i}"
            if i % 31 % 5 == 0:   # a query text keeps its task wherever it recurs
                rec["task"] = "classification"
            f.write(json.dumps(rec) + "\n")
    return path


class CharTokenizer:
    pad_id, vocab_size = 0, 128

    def encode(self, texts, max_length, prefixes=None):
        prefixes = prefixes or [""] * len(texts)
        return [[1 + (ord(c) % 120) for c in (p + t)][:max_length] or [1] for p, t in zip(prefixes, texts)]


def _iterator(files, signals, tmp_path, **kw):
    c = ml_collections.ConfigDict(dict(
        datasets=[{"name": "pairs", "builder": "jsonl", "files": [str(f) for f in files], "task": "search result",
                   "weight": 1.0}], mode="homogeneous", query_max_length=16, document_max_length=24,
        query_length_buckets=(), document_length_buckets=(), num_negatives=2, on_bad_record="strict",
        max_text_chars=1000, data_dir=str(tmp_path / "tfds"), shuffle=True, prefetch=0, packing=False,
        teacher=str(signals)))
    c.update(kw)
    return make_train_iterator(c, tokenizer=CharTokenizer(), prompts=Prompts(), global_batch_size=8, seed=3,
                               **{k: v for k, v in kw.items() if k in ("process_index", "process_count")})


@pytest.fixture(scope="module")
def signals(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    data = _records(d / "pairs.jsonl")
    run_teacher(HashTeacher(), [str(data)], d / "signals", store="both", quiet=True)
    return d, data, d / "signals"


def _texts_by_hash(data):
    out = {}
    for line in open(data):
        r = json.loads(line)
        for t in [r["query"], r["positive"], *r["negatives"]]:
            out[tuple(text_ids([t])[0])] = (t, r)
    return out


def _check_rows(batch, by_hash):
    """Every row's teacher entries are the teacher's vectors of that row's own texts (found by its hashes)."""
    b, k = batch["negatives_valid"].shape
    for i in range(b):
        q, rec = by_hash[tuple(batch["query_hash"][i])]
        task = rec.get("task") or "search result"
        np.testing.assert_allclose(batch["teacher_query"][i], HashTeacher.vector("query", task, q), rtol=1e-6)
        p, prec = by_hash[tuple(batch["positive_hash"][i])]
        np.testing.assert_allclose(batch["teacher_positive"][i], HashTeacher.vector("document", prec.get("title"), p),
                                   rtol=1e-6)
        assert batch["teacher_scores"][i, 0] == pytest.approx(float(batch["teacher_query"][i] @ batch["teacher_positive"][i]),
                                                              abs=1e-5)
        for j in range(k):
            if batch["negatives_valid"][i, j]:
                n, _ = by_hash[tuple(batch["negative_hash"][i, j])]
                np.testing.assert_allclose(batch["teacher_negative"][i, j], HashTeacher.vector("document", None, n),
                                           rtol=1e-6)
                assert batch["teacher_scores"][i, 1 + j] == pytest.approx(
                    float(batch["teacher_query"][i] @ batch["teacher_negative"][i, j]), abs=1e-5)
            else:
                assert not batch["teacher_negative"][i, j].any() and batch["teacher_scores"][i, 1 + j] == 0


@pytest.mark.parametrize("packing", [False, True])
def test_signals_join_the_right_rows_after_shuffling_and_packing(signals, tmp_path, packing):
    d, data, out = signals
    by_hash = _texts_by_hash(data)
    it = _iterator([data], out, tmp_path, packing=packing)
    for _ in range(6):   # past an epoch: reshuffled
        batch = next(it)
        assert ("packed_ids" in batch) == packing
        _check_rows(batch, by_hash)


def test_host_slices_carry_their_rows_signals(signals, tmp_path):
    d, data, out = signals
    one = _iterator([data], out, tmp_path)
    hosts = [_iterator([data], out, tmp_path, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        want = next(one)
        got = [next(h) for h in hosts]
        for key in ("teacher_query", "teacher_positive", "teacher_negative", "teacher_scores", "query_hash"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key], err_msg=key)


def test_a_dataset_marked_distill_false_needs_no_signals_and_its_rows_are_not_distilled(signals, tmp_path):
    d, data, out = signals
    other = tmp_path / "translated.jsonl"
    with open(other, "w") as f:   # texts the teacher never saw
        for i in range(20):
            f.write(json.dumps({"query": f"frage {i}", "positive": f"beschreibung {i}",
                                "negatives": [f"andere {i}"]}) + "\n")
    it = _iterator([data], out, tmp_path, mode="mixed", datasets=[
        {"name": "pairs", "builder": "jsonl", "files": [str(data)], "task": "search result", "weight": 1.0},
        {"name": "translated", "builder": "jsonl", "files": [str(other)], "task": "search result", "weight": 1.0,
         "distill": False}])
    by_hash = _texts_by_hash(data)
    seen = set()
    for _ in range(4):
        batch = next(it)
        from_other = batch["dataset"] == 1
        seen.update(from_other.tolist())
        np.testing.assert_array_equal(batch["teacher_valid"], (~from_other).astype(np.float32))
        for key in ("teacher_query", "teacher_positive", "teacher_negative", "teacher_scores"):
            assert not batch[key][from_other].any(), key
        kept = {k: v[~from_other] for k, v in batch.items()}
        _check_rows(kept, by_hash)
    assert seen == {True, False}
    with pytest.raises(SignalsError, match="lack"):   # without the mark the same data is refused
        next(_iterator([data, other], out, tmp_path))
    from embedder.data.data_config import is_distilled
    with pytest.raises(ValueError, match=r"'translated': \"distill\": 'no' must be true or false"):
        is_distilled({"name": "translated", "distill": "no"})


def test_missing_texts_and_other_tasks_are_one_line_errors(signals, tmp_path):
    d, data, out = signals
    other = _records(tmp_path / "other.jsonl", n=45)   # 5 records the teacher never saw
    it = _iterator([other], out, tmp_path, shuffle=False)
    with pytest.raises(SignalsError, match=r"lack \d+ of the batch's .* texts"):
        for _ in range(6):
            next(it)
    with pytest.raises(SignalsError, match="holds no teacher signals"):
        TeacherSignals(tmp_path)


def test_teacher_pass_resumes_and_never_overwrites_other_signals(tmp_path):
    data = _records(tmp_path / "pairs.jsonl")
    out = tmp_path / "signals"
    with pytest.raises(KeyboardInterrupt):
        run_teacher(HashTeacher(fail_after=2), [str(data)], out, chunk_texts=16, quiet=True)
    assert (out / "partial").is_dir() and not (out / "signals.json").exists()
    with pytest.raises(SignalsError, match="not finished"):
        TeacherSignals(out)
    resumed = HashTeacher()
    run_teacher(resumed, [str(data)], out, chunk_texts=16, quiet=True)
    fresh = HashTeacher()
    run_teacher(fresh, [str(data)], tmp_path / "fresh", chunk_texts=16, quiet=True)
    assert 0 < resumed.calls < fresh.calls          # the first chunks were not encoded again
    for name in ("query", "query_keys", "document", "document_keys"):
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), np.load(tmp_path / "fresh" / f"{name}.npy"))
    again = HashTeacher()
    run_teacher(again, [str(data)], out, chunk_texts=16, quiet=True)
    assert again.calls == 0                          # complete: nothing to do
    with pytest.raises(SignalsError, match="another pass"):
        run_teacher(HashTeacher(), [str(data)], out, store="both", quiet=True)


def test_compile_only_batch_carries_the_teacher_entries(signals):
    from embedder.data.abstract_batch import global_batch_shapes

    _, _, out = signals
    c = base_config()
    c.batch_size, c.data.num_negatives, c.data.teacher = 16, 2, str(out)
    shapes = global_batch_shapes(c)
    assert shapes["teacher_query"].shape == (16, 12) and shapes["teacher_negative"].shape == (16, 2, 12)
    assert shapes["teacher_scores"].shape == (16, 3)
