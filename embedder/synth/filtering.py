"""LLM quality filtering: rate (query, positive) and optionally (query, negative) pairs, drop low ones."""
from __future__ import annotations

import collections
from typing import Iterable, Iterator, Mapping

from embedder.synth import prompts
from embedder.synth.answer_parsing import parse_rating
from embedder.synth.runner import LLMRequest, LLMRunner

DEFAULT_PARAMS = {"temperature": 0.0, "max_tokens": 16}


def filter_pairs(
    records: Iterable[Mapping],
    runner: LLMRunner,
    *,
    threshold: float = 2.0,
    check_negatives: bool = False,
    params: Mapping[str, object] = DEFAULT_PARAMS,
    counts: collections.Counter | None = None,
) -> Iterator[dict]:
    """Keep records whose positive is rated >= threshold on the 0-3 relevance scale.

    With `check_negatives`, each negative is rated too and negatives rated
    >= threshold (likely false negatives) are removed; their ratings are kept.
    A record whose positive rating cannot be parsed is skipped and counted.
    """
    low, high = prompts.RELEVANCE_SCALE
    if not low <= threshold <= high:
        raise ValueError(f"--threshold {threshold} is outside the rating scale {low}-{high}")
    counts = counts if counts is not None else collections.Counter()

    def requests():
        for record in records:
            prompt_id, messages = prompts.relevance_rating(record["query"], record["positive"])
            yield LLMRequest(messages, params, tag=(record, prompt_id, None))
            if check_negatives:
                for i, negative in enumerate(record.get("negatives") or []):
                    _, messages = prompts.relevance_rating(record["query"], negative)
                    yield LLMRequest(messages, params, tag=(record, prompt_id, i))

    current, rating, neg_ratings, positive_failed = None, None, {}, False

    def finish():
        if current is None:
            return None
        if rating is None:
            counts["failed" if positive_failed else "unparseable"] += 1
            return None
        if rating < threshold:
            counts["dropped_low_rating"] += 1
            return None
        out = dict(current)
        synth = dict(out.get("synth") or {})
        synth.update({"filter_llm": runner.client.name, "filter_prompt_id": prompt_id_seen, "rating": rating})
        negatives = current.get("negatives")
        if check_negatives and negatives:
            kept, kept_ratings = [], []
            for i, negative in enumerate(negatives):
                r = neg_ratings.get(i)
                if r is None:
                    counts["negatives_unparseable"] += 1  # unknown: keep out rather than risk a false negative
                elif r >= threshold:
                    counts["negatives_dropped"] += 1
                else:
                    kept.append(negative)
                    kept_ratings.append(r)
            out["negatives"] = kept
            synth["negative_ratings"] = kept_ratings
        out["synth"] = synth
        counts["written"] += 1
        return out

    prompt_id_seen = None
    for result in runner.run(requests()):
        record, prompt_id, neg_index = result.request.tag
        if record is not current:
            done = finish()
            if done is not None:
                yield done
            current, rating, neg_ratings, prompt_id_seen = record, None, {}, prompt_id
            positive_failed = False
        if result.answer is None:
            positive_failed = positive_failed or neg_index is None
            continue
        value = parse_rating(result.answer, low, high)
        if neg_index is None:
            rating = value
        else:
            neg_ratings[neg_index] = value
    done = finish()
    if done is not None:
        yield done
