"""Metrics and search of embedder.evaluate against independent references (pytrec_eval, plain loops)."""
import math

import numpy as np
import pytest
import pytrec_eval

from embedder.evaluate.classification import evaluate_classification, evaluate_clustering, k_shot_draws
from embedder.evaluate.pair_scoring import evaluate_pair_classification, evaluate_reranking, evaluate_sts
from embedder.evaluate.retrieval_metrics import mean_metrics
from embedder.evaluate.search import exact_top_k
from embedder.mrl import truncate_normalize


def test_exact_top_k_matches_full_sort_with_small_blocks():
    rng = np.random.RandomState(0)
    q, c = rng.randn(13, 8).astype(np.float32), rng.randn(101, 8).astype(np.float32)
    c[50] = c[7]  # a tie: the lower index must come first
    q[3] = c[7]
    scores, idx = exact_top_k(q, c, 10, query_block=4, corpus_block=16)
    for i in range(13):
        full = [float(np.dot(q[i].astype(np.float64), c[j].astype(np.float64))) for j in range(101)]
        expected = sorted(range(101), key=lambda j: (-round(full[j], 4), j))[:10]
        assert list(idx[i]) == expected
        np.testing.assert_allclose(scores[i], [full[j] for j in expected], rtol=1e-5, atol=1e-5)
    assert list(idx[3][:2]) == [7, 50]
    # k larger than a corpus block: the running best must carry across blocks
    _, idx30 = exact_top_k(q, c, 30, query_block=5, corpus_block=16)
    np.testing.assert_array_equal(idx30, exact_top_k(q, c, 30)[1])
    np.testing.assert_array_equal(idx30[:, :10], idx)
    s_all, i_all = exact_top_k(q, c, 1000)
    assert i_all.shape == (13, 101)


def test_exact_top_k_ties_across_blocks_keep_the_lowest_indices():
    # Every document ties, in blocks smaller than k and not dividing it: the k lowest
    # indices must win, exactly, whatever the blocking (argpartition alone would not).
    c = np.ones((41, 4), np.float32)
    c[[3, 17]] = 2.0  # two strictly better documents
    q = np.ones((3, 4), np.float32)
    for block in (1, 3, 7, 16, 64):
        scores, idx = exact_top_k(q, c, 6, query_block=2, corpus_block=block)
        np.testing.assert_array_equal(idx, [[3, 17, 0, 1, 2, 4]] * 3)
        np.testing.assert_array_equal(scores, [[8, 8, 4, 4, 4, 4]] * 3)


def test_exact_top_k_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same D"):
        exact_top_k(np.zeros((2, 3)), np.zeros((4, 5)), 2)


def _random_run(seed, n_queries=30, n_docs=200, depth=120):
    rng = np.random.RandomState(seed)
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        docs = rng.choice(n_docs, 8, replace=False)
        # graded judgements, some judged non-relevant (0)
        qrels[qid] = {f"d{d}": int(rng.choice([0, 1, 2, 3])) for d in docs}
        qrels[qid][f"d{docs[0]}"] = 2
        retrieved = rng.choice(n_docs, depth, replace=False)
        scores = np.sort(rng.rand(depth))[::-1] + np.arange(depth)[::-1] * 1e-3  # distinct, descending
        run[qid] = {f"d{d}": float(s) for d, s in zip(retrieved, scores)}
        if q % 3 == 0:  # put a relevant doc near the top sometimes
            top = max(run[qid].values()) + 1.0
            run[qid][f"d{docs[0]}"] = top
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_agree_with_pytrec_eval(seed):
    qrels, run = _random_run(seed)
    rankings = {q: sorted(docs, key=lambda d: -docs[d]) for q, docs in run.items()}
    ours = mean_metrics(rankings, qrels)
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1,10,100", "map"})
    ref = ev.evaluate(run)
    # MRR@10: trec_eval's recip_rank on the run cut to its 10 best.
    cut = {q: dict(sorted(d.items(), key=lambda kv: -kv[1])[:10]) for q, d in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    mean = lambda key, res=ref: float(np.mean([res[q][key] for q in qrels]))  # noqa: E731
    assert ours["ndcg_at_10"] == pytest.approx(mean("ndcg_cut_10"), abs=1e-6)
    assert ours["recall_at_1"] == pytest.approx(mean("recall_1"), abs=1e-6)
    assert ours["recall_at_10"] == pytest.approx(mean("recall_10"), abs=1e-6)
    assert ours["recall_at_100"] == pytest.approx(mean("recall_100"), abs=1e-6)
    assert ours["map"] == pytest.approx(mean("map"), abs=1e-6)
    assert ours["mrr_at_10"] == pytest.approx(mean("recip_rank", rr), abs=1e-6)
    assert ours["ndcg_at_10"] > 0 and ours["recall_at_100"] > 0


def test_truncate_normalize_matches_loops():
    rng = np.random.RandomState(1)
    e = rng.randn(5, 12).astype(np.float32)
    out = truncate_normalize(e, 4)
    for i in range(5):
        n = math.sqrt(sum(float(x) ** 2 for x in e[i, :4]))
        np.testing.assert_allclose(out[i], e[i, :4] / n, rtol=1e-6)
    assert truncate_normalize(e, None).shape == (5, 12)
    with pytest.raises(ValueError, match="at most 12"):
        truncate_normalize(e, 16)


def test_k_shot_draws_take_k_per_label_as_mteb_undersamples():
    labels = ["a"] * 10 + ["b"] * 10 + ["c"] * 2
    draws = k_shot_draws(labels, 4, draws=3)
    for idx in draws:
        assert sorted(labels[i] for i in idx) == ["a"] * 4 + ["b"] * 4 + ["c"] * 2
    assert set(draws[0]) != set(draws[1])
    assert [list(d) for d in draws] == [list(d) for d in k_shot_draws(labels, 4, draws=3)]
    # MTEB: one RandomState(42) reshuffles the same list before each draw, first k per label kept
    rng, order, expected = np.random.RandomState(42), list(range(22)), []
    for _ in range(3):
        rng.shuffle(order)
        count, chosen = {}, []
        for i in order:
            if count.get(labels[i], 0) < 4:
                count[labels[i]] = count.get(labels[i], 0) + 1
                chosen.append(i)
        expected.append(chosen)
    assert [list(d) for d in draws] == expected


def _blobs(n_per, centers, rng, noise):
    x = np.concatenate([c + noise * rng.randn(n_per, centers.shape[1]) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per)
    return x.astype(np.float32), y


def test_classification_and_clustering_separate_blobs_and_not_noise():
    rng = np.random.RandomState(0)
    centers = 5 * np.eye(4, 8)
    xtr, ytr = _blobs(20, centers, rng, 0.3)
    xte, yte = _blobs(10, centers, rng, 0.3)
    res = evaluate_classification(xtr, ytr, xte, yte, shots=(2,), seeds=3)
    assert res["accuracy"] == 1.0 and res["f1"] == 1.0 and res["accuracy_2shot"] == 1.0
    assert res["accuracy_2shot_std"] == 0.0
    assert evaluate_clustering(xte, yte, seeds=2)["v_measure"] > 0.99
    assert evaluate_clustering(xte, yte, seeds=2, minibatch=True, batch_size=16)["v_measure"] > 0.99
    noise = rng.randn(*xte.shape).astype(np.float32)
    assert evaluate_clustering(noise, yte, seeds=2)["v_measure"] < 0.5
    rand = evaluate_classification(rng.randn(*xtr.shape), ytr, rng.randn(*xte.shape), yte, shots=(), seeds=1)
    assert rand["accuracy"] < 0.6


def test_sts_and_pair_classification_against_loops():
    from scipy.stats import rankdata

    rng = np.random.RandomState(2)
    a = truncate_normalize(rng.randn(30, 6), None)
    b = truncate_normalize(rng.randn(30, 6), None)
    cos = [sum(float(x) * float(y) for x, y in zip(a[i], b[i])) for i in range(30)]
    gold = [c + 0.5 * rng.randn() for c in cos]
    ra, rb = rankdata(cos), rankdata(gold)
    spearman = np.corrcoef(ra, rb)[0, 1]
    assert evaluate_sts(a, b, gold)["spearman"] == pytest.approx(spearman, abs=1e-6)

    labels = [int(g > 0) for g in gold]
    # Average precision by hand: rank by cosine, mean precision at each positive.
    order = sorted(range(30), key=lambda i: -cos[i])
    hits, precisions = 0, []
    for r, i in enumerate(order, 1):
        if labels[i]:
            hits += 1
            precisions.append(hits / r)
    # Best accuracy over every threshold (predict 1 when cos >= t).
    best = max(sum((cos[i] >= t) == bool(labels[i]) for i in range(30)) / 30 for t in cos + [2.0])
    res = evaluate_pair_classification(a, b, labels)
    assert res["ap"] == pytest.approx(sum(precisions) / len(precisions), abs=1e-6)
    assert res["accuracy"] == pytest.approx(best, abs=1e-9)
    with pytest.raises(ValueError, match="0 or 1"):
        evaluate_pair_classification(a, b, [2] * 30)


def test_reranking_map_and_mrr_against_loops():
    rng = np.random.RandomState(3)
    queries = truncate_normalize(rng.randn(6, 5), None)
    cands, rels, aps, rrs = [], [], [], []
    for i in range(6):
        n = 4 + i
        c = truncate_normalize(rng.randn(n, 5), None)
        rel = np.zeros(n, bool)
        rel[rng.choice(n, 1 + i % 3, replace=False)] = True
        cands.append(c)
        rels.append(rel)
        s = [float(np.dot(queries[i], c[j])) for j in range(n)]
        order = sorted(range(n), key=lambda j: -s[j])
        hits, prec, first = 0, [], None
        for r, j in enumerate(order, 1):
            if rel[j]:
                hits += 1
                prec.append(hits / r)
                first = first or r
        aps.append(sum(prec) / len(prec))
        rrs.append(1 / first if first <= 10 else 0)
    res = evaluate_reranking(queries, cands, rels)
    assert res["map"] == pytest.approx(np.mean(aps), abs=1e-9)
    assert res["mrr_at_10"] == pytest.approx(np.mean(rrs), abs=1e-9)
