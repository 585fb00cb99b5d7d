"""Classification and clustering on frozen embeddings, following MTEB's protocols (on the shipped
Debian tasks they reproduce data/README.md's all-MiniLM-L6-v2 numbers within their seed spread)."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, v_measure_score


def k_shot_draws(labels: Sequence, k: int, draws: int, seed: int = 42) -> list[np.ndarray]:
    """`draws` index sets of k examples per label (fewer when a label has fewer).

    As MTEB: one RandomState(seed) reshuffles the same index list before each draw."""
    rng = np.random.RandomState(seed)
    order = list(range(len(labels)))
    out = []
    for _ in range(draws):
        rng.shuffle(order)
        taken: dict = {}
        chosen = []
        for i in order:
            if taken.get(labels[i], 0) < k:
                taken[labels[i]] = taken.get(labels[i], 0) + 1
                chosen.append(i)
        out.append(np.asarray(chosen, dtype=np.int64))
    return out


def _fit_predict(x_train, y_train, x_test, seed: int, max_iter: int) -> np.ndarray:
    clf = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # MTEB keeps max_iter=100 even when lbfgs has not fully converged; so do we.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    return clf.predict(x_test)


def evaluate_classification(train_emb: np.ndarray, train_labels: Sequence, test_emb: np.ndarray,
                            test_labels: Sequence, *, shots: Sequence[int] = (16,), seeds: int = 5,
                            max_iter: int = 100) -> dict[str, float]:
    """`accuracy`, `f1` (macro) with all train data; `accuracy_{k}shot` (+ `_std`) per k.

    MTEB's `LogisticRegression(max_iter=100)` on the train split's embeddings, with all of it and
    with k-shot draws taken as MTEB undersamples (`k_shot_draws`)."""
    y_train = np.asarray(train_labels)
    y_test = np.asarray(test_labels)
    if len(set(y_train.tolist())) < 2:
        raise ValueError("classification needs at least 2 labels in the train split")
    out = {}
    pred = _fit_predict(train_emb, y_train, test_emb, 42, max_iter)
    out["accuracy"] = float(accuracy_score(y_test, pred))
    out["f1"] = float(f1_score(y_test, pred, average="macro"))
    for k in shots:
        accs = []
        for idx in k_shot_draws(y_train.tolist(), k, seeds):
            pred = _fit_predict(train_emb[idx], y_train[idx], test_emb, 42, max_iter)
            accs.append(accuracy_score(y_test, pred))
        out[f"accuracy_{k}shot"] = float(np.mean(accs))
        out[f"accuracy_{k}shot_std"] = float(np.std(accs))
    return out


def evaluate_clustering(emb: np.ndarray, labels: Sequence, *, seeds: int = 5, minibatch: bool = False,
                        batch_size: int = 500) -> dict[str, float]:
    """`v_measure` (mean over seeds) and `v_measure_std` of k-means with k = number of labels:
    `KMeans(n_init=10)`, or MTEB's `MiniBatchKMeans(batch_size=500)` with `minibatch=True`."""
    labels = np.asarray(labels)
    n_clusters = len(np.unique(labels))
    if n_clusters < 2:
        raise ValueError("clustering needs at least 2 distinct labels")
    scores = []
    for seed in range(seeds):
        if minibatch:
            km = MiniBatchKMeans(n_clusters=n_clusters, batch_size=batch_size, n_init="auto", random_state=seed)
        else:
            km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
        scores.append(v_measure_score(labels, km.fit_predict(emb)))
    return {"v_measure": float(np.mean(scores)), "v_measure_std": float(np.std(scores))}
