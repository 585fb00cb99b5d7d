"""synth unit checks: top-k search, RRF, mining filters and rank windows (model and BM25), answer parsing,
retries, records."""
import collections
import gzip
import json
import math
import random
import sys

import numpy as np
import pytest

from embedder.synth.answer_parsing import extract_json, parse_label, parse_rating, parse_string_list, parse_text
from embedder.synth.cache import ResponseCache, cache_key
from embedder.synth.clients import parse_llm_spec
from embedder.synth.llm_ranking import ranks_descending, reciprocal_rank_fusion
from embedder.synth import cli, lexical
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


def reference_bm25(query, docs, k1=1.5, b=0.75):
    """Plain-Python BM25 as bm25s scores it by default ("lucene"): idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    term weight tf / (tf + k1 * (1 - b + b * |d| / avgdl)), summed over the query's tokens (a repeat counts
    again), with the same tokenizer; returns [(score, doc index)] of the documents scoring > 0, best first."""
    toks = [lexical.bm25_tokens(d) for d in docs]
    n, avgdl = len(toks), sum(len(t) for t in toks) / len(toks)
    df = collections.Counter(w for t in toks for w in set(t))
    out = []
    for j, t in enumerate(toks):
        tf = collections.Counter(t)
        s = sum(math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5)) * tf[w] / (tf[w] + k1 * (1 - b + b * len(t) / avgdl))
                for w in lexical.bm25_tokens(query) if tf[w])
        if s > 0:
            out.append((s, j))
    return sorted(out, key=lambda x: (-x[0], x[1]))


def reference_bow_cosine(a, b):
    ca, cb = collections.Counter(lexical.bm25_tokens(a)), collections.Counter(lexical.bm25_tokens(b))
    dot = sum(ca[w] * cb[w] for w in ca)
    return dot / math.sqrt(sum(v * v for v in ca.values()) * sum(v * v for v in cb.values()))


def test_bm25_tokens_and_top_k_match_reference():
    assert lexical.bm25_tokens("Foo-Bar, BAZ_2!") == ["foo", "bar", "baz_2"]
    assert lexical.bm25_tokens("日本語 ok") == ["日本語", "ok", "日本", "本語"]
    docs = ["the quick brown fox", "a quick quick dog jumps", "brown bears and brown foxes", "lazy dog sleeps",
            "fox fox fox in a very long sentence about many other things entirely"]
    index = lexical.BM25Index([lexical.bm25_tokens(d) for d in docs])
    for q in ["quick fox", "brown brown dog", "dog", "unknown words only", "fox"]:
        ref = reference_bm25(q, docs)
        scores, idx = index.top_k(lexical.bm25_tokens(q), 3)
        assert idx.tolist() == [j for _, j in ref[:3]], q
        np.testing.assert_allclose(scores, [s for s, _ in ref[:3]], rtol=1e-5)
    # Equal scores: the lower index first (docs 0 and 1 are the same text).
    scores, idx = lexical.BM25Index([["x", "y"], ["x", "y"], ["z"]]).top_k(["x"], 1)
    assert idx.tolist() == [0]


APACHE = ("The Apache HTTP Server is a powerful and flexible web server. This package provides the "
          "configuration files, modules and documentation needed to run Apache as a production web server "
          "on Debian systems, with virtual hosts, TLS and logging set up")
BM25_RECORDS = [
    {"query": "apache web server configuration", "positive": APACHE, "title": "apache2"},
    {"query": "nginx reverse proxy", "positive": "nginx is a small, fast web server and reverse proxy."},
    {"query": "python web framework", "positive": "Flask is a lightweight Python web framework."},
    {"query": "terminal text editor", "positive": "vim is a highly configurable terminal text editor."},
]
BM25_EXTRA = [
    {"text": APACHE.upper().replace(",", ";") + "!"},              # a case / punctuation variant: duplicate
    {"text": APACHE.replace("Debian", "Ubuntu")},                  # one word changed in a long text: duplicate
    {"text": "lighttpd is a web server with fast configuration and a small memory footprint"},
    {"text": "Apache Tomcat is a Java servlet container"},
    {"text": "web server benchmark"},
    {"text": "configuration management for many servers"},
    {"text": "an image viewer for the desktop"},
    {"text": "squid is a caching proxy for the web"},
    {"text": "Django is a high-level Python web framework that encourages rapid development"},
    {"text": "nano is a small and friendly text editor"},
    {"text": "a terminal emulator for the desktop"},
]


def bm25_expected_candidates(query, positive_texts, corpus, threshold=0.95):
    """Reference BM25 ranking with the positives and their near-duplicates removed."""
    pos_norm = {normalise_text(p) for p in positive_texts}
    out = []
    for s, j in reference_bm25(query, corpus):
        t = corpus[j]
        if t in positive_texts:
            continue
        if normalise_text(t) in pos_norm or max(reference_bow_cosine(t, p) for p in positive_texts) >= threshold:
            continue
        out.append((s, t))
    return out


def test_bm25_mining_picks_reference_negatives_and_skips_duplicates():
    corpus = [r["positive"] for r in BM25_RECORDS] + [d["text"] for d in BM25_EXTRA]
    ranked = reference_bm25(BM25_RECORDS[0]["query"], corpus)
    # The data is as meant: both variants of the positive outrank every other document lexically.
    assert {j for _, j in ranked[:3]} == {0, 4, 5}
    expected = bm25_expected_candidates(BM25_RECORDS[0]["query"], [APACHE], corpus)
    assert len(expected) >= 4 and all(a[0] - b[0] > 1e-3 for a, b in zip(expected, expected[1:4]))
    counts = collections.Counter()
    cfg = MiningConfig(retriever="bm25", num_negatives=1, rank_window=(1, 1))
    out = list(mine_negatives(BM25_RECORDS, None, config=cfg, extra_corpus=BM25_EXTRA, miner_name="bm25",
                              counts=counts))
    assert len(out) == len(BM25_RECORDS) and counts["dropped_near_duplicates"] >= 2
    first = out[0]
    assert first["negatives"] == [expected[0][1]]
    m = first["synth"]["mining"]
    assert m["retriever"] == "bm25" and m["miner"] == "bm25" and m["method"] == "rank_window" and m["ranks"] == [1]
    np.testing.assert_allclose(m["scores"], [expected[0][0]], rtol=1e-4)
    for r in out:
        assert normalise_text(r["negatives"][0]) != normalise_text(r["positive"])
        assert reference_bow_cosine(r["negatives"][0], r["positive"]) < 0.95
        want = bm25_expected_candidates(r["query"], [r["positive"]], corpus)
        assert r["negatives"] == [want[0][1]]
    # The one-word variant is dropped by its bag-of-words cosine (0.98): with a threshold above 1 it is rank 1.
    cfg = MiningConfig(retriever="bm25", num_negatives=1, rank_window=(1, 1), duplicate_threshold=1.01)
    (first, *_) = mine_negatives(BM25_RECORDS, None, config=cfg, extra_corpus=BM25_EXTRA)
    assert first["negatives"] == [BM25_EXTRA[1]["text"]]
    # The rank window: ranks 2-3 of the surviving candidates, in rank order.
    cfg = MiningConfig(retriever="bm25", num_negatives=2, rank_window=(2, 3))
    (first, *_) = mine_negatives(BM25_RECORDS, None, config=cfg, extra_corpus=BM25_EXTRA)
    assert first["negatives"] == [t for _, t in expected[1:3]] and first["synth"]["mining"]["ranks"] == [2, 3]


def test_bm25_mining_only_retrieves_matching_documents():
    records = [{"query": "zebra", "positive": "a zebra"}, {"query": "lion", "positive": "a lion"}]
    extra = [{"text": "zebra stripes"}, {"text": "unrelated words"}]
    counts = collections.Counter()
    cfg = MiningConfig(retriever="bm25", num_negatives=1, rank_window=(1, 5))
    out = list(mine_negatives(records, None, config=cfg, extra_corpus=extra, counts=counts))
    # "zebra" matches one other document; "lion" none, so its record is not written.
    assert [r["negatives"] for r in out] == [["zebra stripes"]] and counts["too_few_candidates"] == 1


def test_mining_needs_an_encoder_for_the_model_retriever(monkeypatch):
    with pytest.raises(ValueError, match="needs an encoder"):
        mine_negatives(BM25_RECORDS, None, config=MiningConfig(index="exact"))
    with pytest.raises(ValueError, match="--retriever 'tfidf'"):
        MiningConfig(retriever="tfidf")
    cfg = MiningConfig(num_negatives=1, rank_window=(1, 2), index="exact")
    (r, *_) = mine_negatives(BM25_RECORDS, WordEncoder(), config=cfg, miner_name="words")
    assert r["synth"]["mining"]["retriever"] == "model" and r["synth"]["mining"]["miner"] == "words"
    monkeypatch.setitem(sys.modules, "bm25s", None)
    with pytest.raises(ImportError, match="pip install bm25s"):
        mine_negatives(BM25_RECORDS, None, config=MiningConfig(retriever="bm25"))


def test_cli_negatives_with_bm25_needs_no_model(tmp_path, capsys):
    inp, corpus, out = tmp_path / "in.jsonl", tmp_path / "corpus.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in BM25_RECORDS))
    corpus.write_text("".join(json.dumps(d) + "\n" for d in BM25_EXTRA))
    args = ["negatives", "--in", str(inp), "--out", str(out), "--corpus", str(corpus), "--rank-window", "1:2"]
    assert cli.run(args + ["--retriever", "bm25"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(BM25_RECORDS)
    assert all(r["synth"]["mining"]["retriever"] == "bm25" and len(r["negatives"]) == 1 for r in rows)
    all_text = [r["positive"] for r in BM25_RECORDS] + [d["text"] for d in BM25_EXTRA]
    expected = bm25_expected_candidates(BM25_RECORDS[0]["query"], [APACHE], all_text)
    assert rows[0]["negatives"][0] in [t for _, t in expected[:2]]
    for bad, message in ((args, "--model PATH is required with --retriever model"),
                         (args + ["--retriever", "bm25", "--model", "m"], "--retriever bm25 uses no embedding model")):
        with pytest.raises(SystemExit) as exit_info:
            cli.run(bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.run(["negatives", "--help"])
    assert "bm25: rank it by BM25" in " ".join(capsys.readouterr().out.split())


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
