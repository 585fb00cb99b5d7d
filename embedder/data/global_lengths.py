"""Token lengths of the whole global batch, so that every host pads (or packs) its slice to the
same shape."""
from __future__ import annotations

import numpy as np

from embedder.data.packing import packed_rows, rows_needed


def _saturated(buckets, longest: int) -> bool:
    return len(buckets) == 1 or longest > buckets[-2]


class GlobalLengths:
    """Per-record query / positive / negative token lengths of a `TrainIterator`'s datasets.

    Each host tokenises only its own rows, but `jax.make_array_from_process_local_data` needs the
    same shapes on all hosts, so the padded length is the bucket of the longest row of the GLOBAL
    batch. `GlobalLengths` caches each record's token lengths (learnt for free when this host
    tokenises the record as one of its rows) and, for another host's row whose record it has not
    seen, reads and tokenises that record for its lengths only: at most once per record (again
    only where a later epoch picks other hard negatives of it), so a host reads at most the
    records it was not itself given in the first epoch, however long the run; and not at all
    once the rows known so far already reach the largest bucket. Exact: the lengths come from
    the same tokeniser calls as the batch's.

    With `data.packing` the same lengths give every host the same packed row count:
    `sequence_lengths` lists each sequence of any host's slice (learning every unknown length;
    no bucket shortcut there), and `packed_rows` is the rows the fullest slice needs.
    """

    def __init__(self, iterator):
        self.it = iterator
        self.k = iterator.num_negatives
        self.query = [np.full(n, -1, np.int32) for n in iterator.dataset_sizes]
        self.positive = [np.full(n, -1, np.int32) for n in iterator.dataset_sizes]
        # record index -> lengths of each of its negatives (-1 = not tokenised yet); only the
        # negatives some row picked are ever tokenised.
        self.negatives = [{} for _ in iterator.dataset_sizes]
        self.empty = 0
        if self.k:
            empty_prefix = iterator.prompts.document_prefix(None)
            self.empty = len(iterator.tokenizer.encode([""], iterator.document_max_length, [empty_prefix])[0])
        self.records_read = 0  # records read for their lengths only (other hosts' rows)

    def _negative_slots(self, d, idx, count):
        slots = self.negatives[d].get(idx)
        if slots is None:
            slots = self.negatives[d][idx] = np.full(count, -1, np.int32)
        return slots

    def remember(self, rows, records, q_tok, doc_tok):
        """Stores the lengths of this host's own rows, tokenised for the batch ([N] then [N*K] docs)."""
        n = len(rows)
        for i, ((d, pos), record) in enumerate(zip(rows, records)):
            idx = self.it.record_index(d, pos)
            self.query[d][idx] = len(q_tok[i])
            self.positive[d][idx] = len(doc_tok[i])
            if self.k:
                slots = self._negative_slots(d, idx, len(record["negatives"]))
                for slot, j in enumerate(self.it.negative_picks(len(slots), d, pos)):
                    slots[j] = len(doc_tok[n + i * self.k + slot])

    def _row_lengths(self, d, pos, idx):
        """(query length, document length) of one row, or None when a needed length is unknown."""
        q, doc = int(self.query[d][idx]), int(self.positive[d][idx])
        if q < 0:
            return None
        if self.k:
            slots = self.negatives[d].get(idx)
            if slots is None:
                return None
            picks = self.it.negative_picks(len(slots), d, pos)
            if picks:
                lens = slots[picks]
                if (lens < 0).any():
                    return None
                doc = max(doc, int(lens.max()))
            if len(picks) < self.k:
                doc = max(doc, self.empty)
        return q, doc

    def _learn(self, rows):
        """Reads and tokenises the records at `rows` for their lengths only."""
        it = self.it
        records = it.read_records(rows)
        self.records_read += len(records)
        q_tok = it.tokenizer.encode([r["query"] for r in records], it.query_max_length,
                                    it.query_prefixes(records, [d for d, _ in rows]))
        p_tok = it.tokenizer.encode([r["positive"] for r in records], it.document_max_length,
                                    it.document_prefixes(records))
        neg_texts, neg_where = [], []
        for i, ((d, pos), record) in enumerate(zip(rows, records)):
            idx = it.record_index(d, pos)
            self.query[d][idx] = len(q_tok[i])
            self.positive[d][idx] = len(p_tok[i])
            if self.k:
                slots = self._negative_slots(d, idx, len(record["negatives"]))
                for j in it.negative_picks(len(slots), d, pos):
                    if slots[j] < 0:
                        neg_texts.append(record["negatives"][j])
                        neg_where.append((slots, j))
        if neg_texts:
            empty_prefix = it.prompts.document_prefix(None)
            n_tok = it.tokenizer.encode(neg_texts, it.document_max_length, [empty_prefix] * len(neg_texts))
            for (slots, j), t in zip(neg_where, n_tok):
                slots[j] = len(t)

    def global_longest(self, other_rows, q_longest: int, d_longest: int) -> tuple[int, int]:
        """Query / document lengths whose buckets are those of the longest rows of the global batch
        (this host's longest rows given, plus `other_rows`); exact maxima unless already in the top bucket."""
        it = self.it
        unknown = []
        for d, pos in other_rows:
            lengths = self._row_lengths(d, pos, it.record_index(d, pos))
            if lengths is None:
                unknown.append((d, pos))
            else:
                q_longest, d_longest = max(q_longest, lengths[0]), max(d_longest, lengths[1])
        if unknown and not (_saturated(it.query_buckets, q_longest)
                            and _saturated(it.document_buckets, d_longest)):
            self._learn(unknown)
            for d, pos in unknown:
                q, doc = self._row_lengths(d, pos, it.record_index(d, pos))
                q_longest, d_longest = max(q_longest, q), max(d_longest, doc)
        return q_longest, d_longest

    def sequence_lengths(self, rows) -> np.ndarray:
        """Token length of each sequence of the host slice `rows` [(dataset, position)], in the
        order `pack_batch` numbers them: queries, positives, then negatives b*K+k (an empty slot
        is the prompt-only sequence the batch puts there). Learns every unknown length first."""
        it, k = self.it, self.k
        unknown = [(d, pos) for d, pos in rows if self._row_lengths(d, pos, it.record_index(d, pos)) is None]
        if unknown:
            self._learn(unknown)
        n = len(rows)
        out = np.full(n * (2 + k), self.empty, np.int64)
        for i, (d, pos) in enumerate(rows):
            idx = it.record_index(d, pos)
            out[i], out[n + i] = self.query[d][idx], self.positive[d][idx]
            if k:
                slots = self.negatives[d][idx]
                picks = it.negative_picks(len(slots), d, pos)
                out[2 * n + i * k:2 * n + i * k + len(picks)] = slots[picks]
        return out

    def packed_rows(self, slices, row_length: int, row_multiple: int) -> int:
        """The packed row count of every host's batch: `packed_rows` of the most rows any of the
        host `slices` (each a list of rows) needs, packed best-fit decreasing like `pack_batch`."""
        needed = max((rows_needed(self.sequence_lengths(rows), row_length) for rows in slices), default=0)
        return packed_rows(needed, row_multiple)
