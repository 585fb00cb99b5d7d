"""synth unit checks: top-k search, RRF, mining filters and rank windows, answer parsing, retries, records."""
import collections
import gzip
import json
import random

import numpy as np
import pytest

from embedder.synth.answer_parsing import extract_json, parse_label, parse_rating, parse_string_list, parse_text
from embedder.synth.cache import ResponseCache, cache_key
from embedder.synth.clients import parse_llm_spec
from embedder.synth.llm_ranking import ranks_descending, reciprocal_rank_fusion
from embedder.synth.nearest import exact_top_k, faiss_available, faiss_top_k
from embedder.synth.negatives import MiningConfig, mine_negatives, normalise_text
from embedder.synth.records import RecordError, read_pairs, read_passages
from embedder.synth.retry import RetryableError, RetryPolicy, call_with_retries, parse_retry_after


def reference_top_k(q, d, k):
    """Plain loops: score every pair, sort each row by (-score, index)."""
    scores, idx = [], []
    for i in range(q.shape[0]):
        row = [(-float(np.dot(q[i], d[j])), j) for j in range(d.shape[0])]
        row.sort()
        idx.append([j for _, j in row[:k]])
        scores.append([-s for s, _ in row[:k]])
    return np.array(scores, np.float32), np.array(idx)


@pytest.mark.parametrize("query_chunk,doc_chunk", [(1024, 65536), (3, 7), (1, 1)])
def test_exact_top_k_matches_loop_reference(query_chunk, doc_chunk):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(11, 8)).astype(np.float32)
    d = rng.normal(size=(40, 8)).astype(np.float32)
    d[5] = d[6]  # a tie: the lower index must win regardless of chunking
    s, i = exact_top_k(q, d, 9, query_block=query_chunk, corpus_block=doc_chunk)
    rs, ri = reference_top_k(q, d, 9)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-5)


def test_faiss_matches_exact_when_installed():
    if not faiss_available():
        pytest.skip("faiss not installed")
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(5, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    np.testing.assert_array_equal(faiss_top_k(q, d, 6)[1], exact_top_k(q, d, 6)[1])


def test_exact_top_k_errors():
    with pytest.raises(ValueError, match="Q, D"):
        exact_top_k(np.zeros((2, 3)), np.zeros((4, 5)), 2)


def test_rrf_against_hand_computation():
    rel = ranks_descending([3, 1, 3, 0], tiebreak=[2, 1, 0, 3])  # ties on 3: lower tiebreak first
    assert rel == [2, 3, 1, 4]
    ql = ranks_descending([10, 90, 50, 5], tiebreak=[0, 1, 2, 3])
    assert ql == [3, 1, 2, 4]
    fused = reciprocal_rank_fusion([rel, ql], k=60)
    expected = [1 / 62 + 1 / 63, 1 / 63 + 1 / 61, 1 / 61 + 1 / 62, 2 / 64]
    np.testing.assert_allclose(fused, expected)


class WordEncoder:
    """Bag of words over a fixed vocabulary, L2-normalised; the Embedder.encode signature."""

    def __init__(self):
        self.calls = []

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None):
        self.calls.append((role, task, len(texts), titles is not None))
        vocab = {}
        out = np.zeros((len(texts), 256), np.float32)
        for i, t in enumerate(texts):
            for w in normalise_text(t).split():
                out[i, hash_word(w)] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def hash_word(w):
    return sum((i + 1) * ord(c) for i, c in enumerate(w)) % 256


def make_records():
    topics = ["audio", "video", "network", "kernel", "font", "game", "editor", "shell", "mail", "image"]
    recs = []
    for i in range(40):
        t = topics[i % 10]
        recs.append({"query": f"{t} tool {i}", "positive": f"{t} tool number {i} handles {t} tasks", "title": f"pkg{i}"})
    # A near-duplicate of record 0's positive (case and punctuation only) that must never be its negative.
    recs.append({"query": "other query", "positive": "AUDIO tool, number 0 handles audio tasks!"})
    # The same query with a second positive: both positives are excluded for either record.
    recs.append({"query": "audio tool 0", "positive": "second positive about audio tool 0"})
    return recs


def test_mining_rank_window_excludes_positives_and_duplicates():
    recs = make_records()
    enc = WordEncoder()
    counts = collections.Counter()
    cfg = MiningConfig(num_negatives=3, rank_window=(2, 6), duplicate_threshold=0.9, index="exact", seed=3)
    out = list(mine_negatives(recs, enc, config=cfg, task="search result", counts=counts))
    assert len(out) == len(recs) and counts["written"] == len(recs)
    assert [c[:2] for c in enc.calls] == [("document", "search result"), ("query", "search result")]
    positives_of = collections.defaultdict(set)
    for r in recs:
        positives_of[r["query"]].add(normalise_text(r["positive"]))
    for r in out:
        m = r["synth"]["mining"]
        assert len(r["negatives"]) == 3 and m["method"] == "rank_window"
        assert all(2 <= rank <= 6 for rank in m["ranks"]) and m["ranks"] == sorted(m["ranks"])
        for n in r["negatives"]:
            assert normalise_text(n) not in positives_of[r["query"]]
    assert counts["dropped_near_duplicates"] >= 1
    # Deterministic for a seed.
    again = list(mine_negatives(recs, WordEncoder(), config=cfg, task="search result"))
    assert [r["negatives"] for r in again] == [r["negatives"] for r in out]


def test_mining_negatives_are_closer_than_random():
    recs = make_records()[:40]
    enc = WordEncoder()
    cfg = MiningConfig(num_negatives=1, rank_window=(1, 3), index="exact")
    out = list(mine_negatives(recs, enc, config=cfg))
    q = enc.encode([r["query"] for r in out])
    n = enc.encode([r["negatives"][0] for r in out])
    rnd = enc.encode([recs[(i * 7 + 3) % 40]["positive"] for i in range(40)])
    assert float(np.mean(np.sum(q * n, 1))) > float(np.mean(np.sum(q * rnd, 1))) + 0.1


def test_mining_config_errors():
    with pytest.raises(ValueError, match="rank-window"):
        MiningConfig(rank_window=(0, 5))
    with pytest.raises(ValueError, match="fewer than"):
        MiningConfig(rank_window=(3, 4), num_negatives=3)


def test_answer_parsing():
    assert extract_json('noise ```json\n{"a": 1}\n``` tail') == {"a": 1}
    assert extract_json('Answer: {"rating": 2} thanks') == {"rating": 2}
    assert extract_json("no json here {") is None
    assert parse_text('{"query": "  spaced   out "}', "query") == "spaced out"
    assert parse_text('{"query": ""}', "query") is None
    assert parse_rating('{"rating": 2}', 0, 3) == 2.0
    assert parse_rating('{"rating": "3"}', 0, 3) == 3.0
    assert parse_rating('{"rating": 7}', 0, 3) is None  # out of scale is garbage, not clipped
    assert parse_rating('{"rating": true}', 0, 3) is None
    assert parse_string_list('{"items": ["a", " ", "b"]}', "items") == ["a", "b"]
    assert parse_string_list('["x"]', "items") == ["x"]
    assert parse_label('{"label": "Positive"}', ["positive", "negative"]) == "positive"
    assert parse_label('{"label": "meh"}', ["positive", "negative"]) is None


def test_retry_policy_and_retry_after():
    policy = RetryPolicy(max_retries=3, base_delay=0.5, max_delay=1.0, max_retry_after=10)
    rng = random.Random(0)
    for attempt in range(6):
        d = policy.delay(attempt, None, rng)
        assert 0 <= d <= min(1.0, 0.5 * 2**attempt)
    assert policy.delay(0, 4.0, rng) >= 4.0 and policy.delay(0, 99.0, rng) == 10.0
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RetryableError("429", retry_after=0.25)
        return "ok"

    assert call_with_retries(flaky, policy, sleep=waits.append, rng=rng) == "ok"
    assert len(waits) == 2 and all(w >= 0.25 for w in waits)
    with pytest.raises(RetryableError):
        call_with_retries(lambda: (_ for _ in ()).throw(RetryableError("x")), policy, sleep=waits.append)


def test_cache_key_and_persistence(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    k = cache_key("openai", "m", msgs, {"temperature": 0.0})
    assert k == cache_key("openai", "m", [dict(msgs[0])], {"temperature": 0.0})
    assert len({k, cache_key("gemini", "m", msgs, {"temperature": 0.0}), cache_key("openai", "m2", msgs, {}),
                cache_key("openai", "m", msgs, {"temperature": 0.5})}) == 4
    c = ResponseCache(tmp_path)
    c.put(k, "openai:m", "answer")
    c.close()
    assert ResponseCache(tmp_path).get(k) == "answer"


def test_llm_spec():
    assert parse_llm_spec("openai:qwen2.5-7b") == ("openai", "qwen2.5-7b")
    assert parse_llm_spec("gemini:gemini-2.5-flash") == ("gemini", "gemini-2.5-flash")
    for bad in ("qwen", "azure:x", "openai:"):
        with pytest.raises(ValueError, match="BACKEND:MODEL"):
            parse_llm_spec(bad)


def test_reads_debian_pairs_and_counts_bad_lines(debian_dir, tmp_path):
    pairs = []
    for i, r in enumerate(read_pairs(debian_dir / "train_pairs.jsonl.gz")):
        pairs.append(r)
        if i == 4:
            break
    assert pairs[0]["title"] == "0ad" and pairs[0]["positive"].startswith("0 A.D.")
    path = tmp_path / "mixed.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"query": "q", "positive": "p", "negatives": ["n"]}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"query": "q", "positive": ""}) + "\n")
        f.write(json.dumps({"_id": "d1", "title": "T", "text": "corpus text"}) + "\n")
    counts = {}
    assert [r["query"] for r in read_pairs(path, counts=counts)] == ["q"]
    assert counts == {"bad_lines": 1, "bad_records": 2}
    with pytest.raises(RecordError, match=r"mixed.jsonl.gz:2"):
        list(read_pairs(path, strict=True))
    assert [p["text"] for p in read_passages(path, counts={})] == ["p", "corpus text"]
