"""Hard-negative mining: retrieve top-k (embedding model or BM25), drop the positive and its near-duplicates,
pick negatives."""
from __future__ import annotations

import collections
import dataclasses
import random
import re
import unicodedata
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from embedder.synth import lexical, prompts
from embedder.synth.answer_parsing import parse_rating
from embedder.synth.llm_ranking import ranks_descending, reciprocal_rank_fusion
from embedder.synth.runner import LLMRequest, LLMRunner


class Encoder(Protocol):
    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None) -> np.ndarray: ...


RETRIEVERS = ("model", "bm25")


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    retriever: str = "model"  # "model": nearest neighbours of an encoder's embeddings; "bm25": lexical BM25
    num_negatives: int = 1
    top_k: int = 30  # candidates shown to the LLM
    rank_window: tuple[int, int] = (10, 30)  # 1-based inclusive, used without an LLM
    # Cosine to a positive at or above which a candidate is a duplicate: embedding cosine with the
    # model retriever, bag-of-words cosine (BM25 tokens) with bm25.
    duplicate_threshold: float = 0.95
    index: str = "auto"  # model retriever only: exact, faiss or auto
    seed: int = 0
    relabel_positive: bool = False  # Gecko: make the LLM's top candidate the positive
    llm_params: tuple = (("temperature", 0.0), ("max_tokens", 16))

    def __post_init__(self):
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"--retriever {self.retriever!r}: choose {' or '.join(RETRIEVERS)}")
        lo, hi = self.rank_window
        if self.num_negatives < 1 or self.top_k < 1:
            raise ValueError(f"need --num-negatives >= 1 and --top-k >= 1, got {self.num_negatives}, {self.top_k}")
        if not 1 <= lo <= hi:
            raise ValueError(f"--rank-window {lo}:{hi}: need 1 <= start <= end (1-based ranks, inclusive)")
        if hi - lo + 1 < self.num_negatives:
            raise ValueError(f"--rank-window {lo}:{hi} holds fewer than --num-negatives={self.num_negatives} ranks")


_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def normalise_text(text: str) -> str:
    """Case, accents, punctuation and whitespace folded: texts equal after this are duplicates."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCT.sub(" ", text).strip()


def build_corpus(records: Sequence[dict], extra: Sequence[dict] = ()) -> tuple[list[str], list[str], dict[str, int]]:
    """(texts, titles, index of text): positives of the records first, then `extra` {"text", "title"} docs."""
    texts, titles, index = [], [], {}
    for text, title in [(r["positive"], r.get("title") or "") for r in records] + [
            (d["text"], d.get("title") or "") for d in extra]:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
            titles.append(title)
    return texts, titles, index


# For each distinct query, its retrieved (scores, doc indices) arrays, best first; and similarity(d, p) of
# two corpus documents, compared with `duplicate_threshold` for a candidate d and each positive p.
Ranked = Sequence[tuple[np.ndarray, np.ndarray]]
Similarity = Callable[[int, int], float]


def _model_retrieval(texts, titles, query_texts, encoder, task, batch_size, depth, cfg) -> tuple[Ranked, Similarity]:
    """Nearest neighbours of the encoder's query embeddings among its document embeddings; embedding cosine."""
    from embedder.synth.nearest import top_k as nearest_top_k  # scikit-learn (via embedder.evaluate)

    use_titles = titles if any(titles) else None
    doc_emb = np.asarray(encoder.encode(texts, role="document", task=task, batch_size=batch_size, titles=use_titles),
                         dtype=np.float32)
    q_emb = np.asarray(encoder.encode(query_texts, role="query", task=task, batch_size=batch_size), dtype=np.float32)
    scores, indices = nearest_top_k(q_emb, doc_emb, depth, index=cfg.index)
    return list(zip(scores, indices)), lambda d, p: float(doc_emb[d] @ doc_emb[p])


def _bm25_retrieval(texts, query_texts, depth) -> tuple[Ranked, Similarity]:
    """BM25 over the documents' texts (titles are not indexed); bag-of-words cosine on the same tokens."""
    doc_tokens = [lexical.bm25_tokens(t) for t in texts]
    ranked = lexical.bm25_top_k([lexical.bm25_tokens(q) for q in query_texts], doc_tokens, depth)
    bags: dict[int, collections.Counter] = {}

    def bag(d):
        if d not in bags:
            bags[d] = collections.Counter(doc_tokens[d])
        return bags[d]

    return ranked, lambda d, p: lexical.bag_of_words_cosine(bag(d), bag(p))


def _candidates(scores, indices, similarity, norm_texts, positives_of_query, cfg, counts):
    """Retrieved (doc index, score) pairs, best first, with positives and their near-duplicates removed."""
    pos = positives_of_query
    pos_norm = {norm_texts[p] for p in pos}
    out = []
    for s, d in zip(scores, indices):
        d = int(d)
        if d in pos:
            continue
        if norm_texts[d] in pos_norm or max(similarity(d, p) for p in pos) >= cfg.duplicate_threshold:
            counts["dropped_near_duplicates"] += 1
            continue
        out.append((d, float(s)))
    return out


def mine_negatives(
    records: Sequence[dict],
    encoder: Encoder | None,
    *,
    config: MiningConfig = MiningConfig(),
    task: str | None = None,
    extra_corpus: Sequence[dict] = (),
    runner: LLMRunner | None = None,
    miner_name: str = "",
    batch_size: int = 64,
    counts: collections.Counter | None = None,
) -> Iterator[dict]:
    """Yield each record with `negatives` replaced by mined ones and provenance in synth["mining"].

    The corpus is the records' positives plus `extra_corpus`. Every positive of
    the same query text is excluded, not only the record's own, and so is every candidate whose
    normalised text equals a positive's or whose cosine to one is >= `duplicate_threshold`.

    `config.retriever` ranks the corpus for each query: "model" by the cosine of `encoder`'s
    embeddings (titles passed to the encoder when any document has one); "bm25" by BM25 over the
    document texts (`embedder.synth.lexical`, no encoder: pass None), where only documents sharing
    a token with the query are retrieved and near-duplicates are judged by bag-of-words cosine.

    Without an LLM (`runner=None`) the negatives are drawn from a rank window of the surviving
    candidates (default ranks 10-30, 1-based, inclusive): close enough to be hard, far enough
    from the top that unlabelled true positives are rarer. With an LLM, the first `top_k`
    candidates are rated twice (graded relevance, query likelihood), the two rankings are fused
    with reciprocal rank fusion, and the lowest-fused candidates become the negatives.
    """
    if config.retriever == "model" and encoder is None:
        raise ValueError("retriever 'model' needs an encoder (or use retriever 'bm25', which needs none)")
    if config.retriever == "bm25":
        lexical.require_bm25s()
    return _mine(records, encoder, config, task, extra_corpus, runner, miner_name, batch_size,
                 counts if counts is not None else collections.Counter())


def _mine(records, encoder, cfg, task, extra_corpus, runner, miner_name, batch_size, counts):
    texts, titles, doc_index = build_corpus(records, extra_corpus)
    query_texts = list(dict.fromkeys(r["query"] for r in records))
    query_row = {q: i for i, q in enumerate(query_texts)}
    positives = collections.defaultdict(set)
    for r in records:
        positives[r["query"]].add(doc_index[r["positive"]])
    depth = max(cfg.top_k, cfg.rank_window[1]) + max(len(p) for p in positives.values()) + 16
    if cfg.retriever == "bm25":
        ranked, similarity = _bm25_retrieval(texts, query_texts, depth)
    else:
        ranked, similarity = _model_retrieval(texts, titles, query_texts, encoder, task, batch_size, depth, cfg)
    norm_texts = [normalise_text(t) for t in texts]

    per_record = [_candidates(*ranked[query_row[r["query"]]], similarity, norm_texts, positives[r["query"]],
                              cfg, counts) for r in records]
    provenance = {"miner": miner_name, "retriever": cfg.retriever}
    if runner is None:
        yield from _pick_from_window(records, per_record, texts, cfg, provenance, counts)
    else:
        yield from _pick_by_llm(records, per_record, texts, cfg, runner, provenance, counts)


def _with_negatives(record: dict, negatives: list[str], mining: dict) -> dict:
    out = dict(record)
    out["negatives"] = negatives
    synth = dict(out.get("synth") or {})
    synth["mining"] = mining
    out["synth"] = synth
    return out


def _pick_from_window(records, per_record, texts, cfg, provenance, counts):
    lo, hi = cfg.rank_window
    for i, (r, cands) in enumerate(zip(records, per_record)):
        window = list(enumerate(cands, 1))[lo - 1:hi]
        if len(window) < cfg.num_negatives:
            counts["too_few_candidates"] += 1
            if not window:
                continue
        rng = random.Random(cfg.seed * 1_000_003 + i)
        chosen = sorted(rng.sample(window, min(cfg.num_negatives, len(window))))
        counts["written"] += 1
        yield _with_negatives(r, [texts[d] for _, (d, _) in chosen], {
            **provenance, "method": "rank_window", "rank_window": [lo, hi],
            "ranks": [rank for rank, _ in chosen], "scores": [round(s, 5) for _, (_, s) in chosen]})


def _pick_by_llm(records, per_record, texts, cfg, runner, provenance, counts):
    params = dict(cfg.llm_params)
    rel_low, rel_high = prompts.RELEVANCE_SCALE
    ql_low, ql_high = prompts.QUERY_LIKELIHOOD_SCALE

    def requests():
        for i, (r, cands) in enumerate(zip(records, per_record)):
            docs = [d for d, _ in cands[:cfg.top_k]]
            if not docs:
                counts["too_few_candidates"] += 1
                continue
            if cfg.relabel_positive:
                docs = [-1] + docs  # -1 stands for the record's own positive
            for slot, d in enumerate(docs):
                passage = r["positive"] if d < 0 else texts[d]
                rel_id, rel_messages = prompts.relevance_rating(r["query"], passage)
                ql_id, ql_messages = prompts.query_likelihood(r["query"], passage)
                yield LLMRequest(rel_messages, params, tag=(i, slot, d, "relevance", rel_id))
                yield LLMRequest(ql_messages, params, tag=(i, slot, d, "likelihood", ql_id))

    def finish(i, slots):
        r, cands = records[i], per_record[i]
        retrieval_rank = {d: rank for rank, (d, _) in enumerate(cands, 1)}
        rated = [(d, v["relevance"], v["likelihood"]) for d, v in slots.items()
                 if v.get("relevance") is not None and v.get("likelihood") is not None]
        counts["unrated_candidates"] += len(slots) - len(rated)
        pool = [x for x in rated if x[0] >= 0]
        if len(pool) < 1:
            counts["too_few_candidates"] += 1
            return None
        tiebreak = [retrieval_rank.get(d, 0) for d, _, _ in rated]
        rel_ranks = ranks_descending([x[1] for x in rated], tiebreak)
        ql_ranks = ranks_descending([x[2] for x in rated], tiebreak)
        fused = reciprocal_rank_fusion([rel_ranks, ql_ranks])
        order = sorted(range(len(rated)), key=lambda j: (-fused[j], tiebreak[j]))
        ordered = [(rated[j], fused[j]) for j in order]
        negatives = [x for x in ordered if x[0][0] >= 0][-cfg.num_negatives:]
        if len(negatives) < cfg.num_negatives:
            counts["too_few_candidates"] += 1
        out = dict(r)
        mining = {**provenance, "method": "llm_rrf", "llm": runner.client.name,
                  "prompt_id": ["rate/relevance/v1", "rate/query_likelihood/v1"],
                  "ranks": [retrieval_rank[d] for (d, _, _), _ in negatives],
                  "relevance": [rel for (_, rel, _), _ in negatives],
                  "likelihood": [ql for (_, _, ql), _ in negatives],
                  "rrf": [round(f, 6) for _, f in negatives]}
        if cfg.relabel_positive:
            top = ordered[0][0][0]
            if top >= 0:
                counts["relabelled"] += 1
                mining["original_positive"] = r["positive"]
                out["positive"] = texts[top]
                # In a small pool the new positive could also be among the lowest: never both.
                negatives = [x for x in negatives if x[0][0] != top]
        counts["written"] += 1
        return _with_negatives(out, [texts[d] for (d, _, _), _ in negatives], mining)

    current, slots = None, {}
    for result in runner.run(requests()):
        i, slot, d, kind, _ = result.request.tag
        if i != current:
            if current is not None:
                done = finish(current, slots)
                if done is not None:
                    yield done
            current, slots = i, {}
        low, high, field = (rel_low, rel_high, "rating") if kind == "relevance" else (ql_low, ql_high, "likelihood")
        value = None
        if result.answer is None:
            counts["failed"] += 1
        else:
            value = parse_rating(result.answer, low, high, field=field)
            if value is None:
                counts["unparseable"] += 1
        slots.setdefault(d, {})[kind] = value
    if current is not None:
        done = finish(current, slots)
        if done is not None:
            yield done
