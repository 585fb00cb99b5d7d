"""The training input pipeline: prepared datasets -> host-local, bucketed, tokenised batches.

`make_train_iterator` returns a `TrainIterator` whose batches follow ARCHITECTURE.md "Batches"
(options: `embedder.data.data_config`) and whose `get_state()`/`set_state()` resume exactly."""
from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import weakref

import grain
import numpy as np

from embedder.data.builders import prepare_dataset
from embedder.data.data_config import checked_buckets, dataset_entries, is_distilled
from embedder.data.global_lengths import GlobalLengths
from embedder.data.mixture import MixtureSchedule
from embedder.data.packing import pack_batch
from embedder.data.prompts import Prompts
from embedder.data.tokenizer import pad_batch
from embedder.data.text_identity import text_ids

log = logging.getLogger(__name__)

STATE_VERSION = 2
# Prefetch threads must stop before interpreter teardown: a daemon thread killed inside the
# tokenizer's or array_record's C++ code aborts the process ("terminate called ...").
_LIVE_ITERATORS: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()


@atexit.register
def _stop_all_workers():
    for it in list(_LIVE_ITERATORS):
        it.close()


def _derive_seed(*parts) -> int:
    """A 32-bit seed (what grain accepts) from several integers."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _record_order(n, shuffle, seed, name):
    """Record index at each position of one dataset's global stream: a seeded permutation of
    all n records, reshuffled every epoch (grain's shuffle reseeds per epoch under repeat).
    Nothing here depends on the process count, so every host sees the same order."""
    if n == 0:
        raise ValueError(f"dataset {name!r} has no records; check its files or drop it from data_config.datasets")
    order = grain.MapDataset.range(n)
    if shuffle:
        order = order.shuffle(seed=seed)
    return order.repeat(None)


def _fit_bucket(buckets, longest: int) -> int:
    return next(b for b in buckets if b >= max(longest, 1))


def global_sequence_ids(ids: np.ndarray, n: int, lo: int, b: int, k: int) -> np.ndarray:
    """Packed sequence ids of a host slice (`n` rows from row `lo` of a global batch of `b`, `k`
    negatives each; numbered by `pack_batch`) renumbered as in the global batch: queries
    `lo..lo+n-1`, positives `b+lo..`, negatives `2b + (lo+i)*k + j`; -1 (padding) stays."""
    shift = np.where(ids < n, lo, np.where(ids < 2 * n, b - n + lo, 2 * (b - n) + lo * k))
    return np.where(ids < 0, ids, ids + shift).astype(ids.dtype)


class TrainIterator:
    """Host-local batches of a task mixture; exact save/restore via `get_state`/`set_state`.

    The batches do not depend on the process count. Each dataset has ONE global order (a seeded
    permutation of all its records per epoch) and `MixtureSchedule` decides, from (seed, step)
    alone, which dataset feeds each row of the global batch; a row's record is the next unused
    position of its dataset's order. Host p of P takes rows [p*B/P, (p+1)*B/P) of every global
    batch and reads only those records (random access), so the hosts' slices, concatenated in
    process order, are exactly the global batch of a 1-process run (a host may also read another
    host's record once, for its token lengths). All hosts pad to the bucket of the global batch's
    longest row (`global_lengths.GlobalLengths`), so their arrays have one shape;
    with `data.packing`, likewise, every host packs into the row count the fullest host slice needs,
    and numbers its packed sequences as the global batch does (`global_sequence_ids`).
    The iterator state is the step counter plus a fingerprint of the data setup (no process count:
    a run may resume on another host count); take `get_state()` when the batches of the completed
    steps have been consumed and no more. With a shared `data_dir`, prepare datasets once (one
    host, or ahead of the job) before many hosts open them.
    """

    def __init__(self, datasets, entries, data_config, *, tokenizer, prompts, global_batch_size, seed,
                 process_index=0, process_count=1, row_multiple=8, num_negatives=None):
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count="
                             f"{process_count}; pick a multiple of {process_count}")
        self.packing = bool(data_config.get("packing", False))
        self.row_multiple = int(row_multiple)
        self.tokenizer = tokenizer
        self.prompts = prompts if isinstance(prompts, Prompts) else Prompts.from_spec(prompts)
        self.entries = entries
        self._distilled = np.array([is_distilled(e) for e in entries], bool)   # per dataset, data.teacher's rows
        self.dataset_names = [e["name"] for e in entries]
        self.global_batch_size = int(global_batch_size)
        self.host_batch_size = self.global_batch_size // process_count
        self.seed, self.process_index, self.process_count = int(seed), process_index, process_count
        self.mode = data_config.mode
        self.shuffle = bool(data_config.shuffle)
        # `num_negatives`: data_config.num_negatives with -1 resolved (`negatives_per_row`).
        self.num_negatives = int(data_config.num_negatives if num_negatives is None else num_negatives)
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives={self.num_negatives} must be >= 0 (make_train_iterator resolves "
                             "data_config.num_negatives=-1 from the prepared data)")
        self.query_max_length = int(data_config.query_max_length)
        self.document_max_length = int(data_config.document_max_length)
        self.query_buckets = checked_buckets(data_config.query_length_buckets, self.query_max_length,
                                             "query_length_buckets")
        self.document_buckets = checked_buckets(data_config.document_length_buckets,
                                                self.document_max_length, "document_length_buckets")
        # Packed rows hold a whole document; a query longer than that would not fit.
        self.row_length = max(self.query_max_length, self.document_max_length)
        self.schedule = MixtureSchedule([float(e["weight"]) for e in entries], self.seed, self.mode,
                                        self.global_batch_size)
        self._sources = [grain.MapDataset.source(ds.source) for ds in datasets]
        self._orders = [_record_order(len(ds.source), self.shuffle, _derive_seed(self.seed, i), ds.name)
                        for i, ds in enumerate(datasets)]
        self.dataset_sizes = [len(ds.source) for ds in datasets]
        # Only needed when other hosts' rows decide this host's padded length (or packed row count).
        self._lengths = GlobalLengths(self) if process_count > 1 else None
        self.skip_counts_by_dataset = {ds.name: dict(ds.skip_counts) for ds in datasets}
        total = collections.Counter()
        for counts in self.skip_counts_by_dataset.values():
            total.update(counts)
        self.skip_counts = dict(total)
        self.prefetch = int(data_config.prefetch)
        # A teacher's stored signals, joined to each row by its texts' keys (embedder.distill.signals).
        teacher = str(data_config.get("teacher", "") or "")
        if teacher:
            from embedder.distill.signals import TeacherSignals
            self.teacher = TeacherSignals(teacher)
        else:
            self.teacher = None
        self._step = 0
        self._consumed = np.zeros(len(entries), np.int64)
        self._worker = None

    # ---- state -------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        # No process count: the batches do not depend on it, so a run may resume on another one.
        return {"datasets": self.dataset_names, "dataset_sizes": self.dataset_sizes,
                "weights": [float(e["weight"]) for e in self.entries], "seed": self.seed, "mode": self.mode,
                "shuffle": self.shuffle, "global_batch_size": self.global_batch_size}

    def get_state(self) -> dict:
        """JSON-able; identical on every host (the schedule is global, positions derive from it)."""
        return {"version": STATE_VERSION, "step": self._step, **self._fingerprint()}

    def set_state(self, state: dict):
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state {state!r} is not a version-{STATE_VERSION} state "
                             "from TrainIterator.get_state() (older versions ordered batches differently; "
                             "start a fresh workdir)")
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("cannot resume the data iterator exactly: the checkpoint's data setup differs "
                             f"({', '.join(f'{k}: saved {a!r} vs now {b!r}' for k, (a, b) in diff.items())}); "
                             "restore the original data config or start a fresh workdir")
        self._stop_worker()
        self._step = int(state["step"])
        self._consumed = self.schedule.consumed_before(self._step)

    # ---- batches -----------------------------------------------------------------------------
    def global_rows(self, step, consumed):
        """[(dataset, stream position)] of every row of the GLOBAL batch at `step`, in batch order,
        and the per-dataset counters after it. Host p's rows are the p-th contiguous slice."""
        labels = self.schedule.labels_at(step)
        positions = np.empty(len(labels), np.int64)
        for d in np.unique(labels):
            where = np.flatnonzero(labels == d)
            positions[where] = consumed[d] + np.arange(len(where))
        taken = np.bincount(labels, minlength=len(self.entries))
        return [(int(d), int(p)) for d, p in zip(labels, positions)], consumed + taken

    def record_index(self, d: int, pos: int) -> int:
        """Which record of dataset `d` sits at position `pos` of its global stream."""
        return int(self._orders[d][pos])

    def negative_picks(self, count: int, d: int, pos: int) -> list[int]:
        """Which of a record's `count` negatives the row at (d, pos) keeps (a seeded K when more)."""
        k = self.num_negatives
        if count <= k:
            return list(range(count))
        rng = np.random.default_rng([self.seed, 0x6E6567, d, pos])
        return sorted(int(i) for i in rng.choice(count, size=k, replace=False))

    def read_records(self, rows) -> list[dict]:
        """Random-access reads of the records at `rows` [(dataset, position)], batched per dataset."""
        records = [None] * len(rows)
        by_dataset = collections.defaultdict(list)
        for i, (d, pos) in enumerate(rows):
            by_dataset[d].append((i, self.record_index(d, pos)))
        for d, items in by_dataset.items():
            # Batched reads let array_record fetch in parallel (~25% faster than one by one).
            fetched = self._sources[d]._getitems([idx for _, idx in items])
            for (i, _), record in zip(items, fetched):
                records[i] = record
        return records

    def query_prefixes(self, records, datasets) -> list[str]:
        return [self.prompts.query_prefix(r["task"] or self.entries[d]["task"]) for r, d in zip(records, datasets)]

    def document_prefixes(self, records) -> list[str]:
        return [self.prompts.document_prefix(r["title"] or None) for r in records]

    def build_batch(self, rows, other_rows=()) -> dict:
        """Tokenises and pads the records at `rows` [(dataset, position)] into one host batch.

        `other_rows` are the rest of the global batch (other hosts' rows): only their token
        lengths matter, so that every host pads to the same bucket."""
        records = self.read_records(rows)
        datasets = [d for d, _ in rows]
        q_prefix = self.query_prefixes(records, datasets)
        d_prefix = self.document_prefixes(records)
        queries = [r["query"] for r in records]
        positives = [r["positive"] for r in records]
        q_tok = self.tokenizer.encode(queries, self.query_max_length, q_prefix)
        doc_texts, doc_prefix = list(positives), list(d_prefix)
        batch = {}
        kept_negatives = [[] for _ in records]
        if self.num_negatives:
            k = self.num_negatives
            valid = np.zeros((len(rows), k), bool)
            neg_hash = np.zeros((len(rows), k, 2), np.uint32)
            empty_prefix = self.prompts.document_prefix(None)
            for i, (r, (d, pos)) in enumerate(zip(records, rows)):
                negs = [r["negatives"][j] for j in self.negative_picks(len(r["negatives"]), d, pos)]
                kept_negatives[i] = negs
                valid[i, :len(negs)] = True
                if negs:
                    neg_hash[i, :len(negs)] = text_ids(negs)
                # Empty slots get a real (prompt-only) sequence so pooling never divides by zero;
                # negatives_valid=False tells the loss to ignore them.
                doc_texts += negs + [""] * (k - len(negs))
                doc_prefix += [empty_prefix] * k
        doc_tok = self.tokenizer.encode(doc_texts, self.document_max_length, doc_prefix)
        n = len(rows)
        q_longest = max((len(t) for t in q_tok), default=0)
        d_longest = max((len(t) for t in doc_tok), default=0)
        if self._lengths is not None:
            self._lengths.remember(rows, records, q_tok, doc_tok)
            q_longest, d_longest = self._lengths.global_longest(other_rows, q_longest, d_longest)
        q_ids, q_mask = pad_batch(q_tok, self.tokenizer.pad_id, (_fit_bucket(self.query_buckets, q_longest),))
        d_ids, d_mask = pad_batch(doc_tok, self.tokenizer.pad_id,
                                  (_fit_bucket(self.document_buckets, d_longest),))
        batch["query_ids"], batch["query_mask"] = q_ids, q_mask
        batch["positive_ids"], batch["positive_mask"] = d_ids[:n], d_mask[:n]
        if self.num_negatives:
            length = d_ids.shape[1]
            batch["negative_ids"] = d_ids[n:].reshape(n, self.num_negatives, length)
            batch["negative_mask"] = d_mask[n:].reshape(n, self.num_negatives, length)
            batch["negatives_valid"] = valid
            batch["negative_hash"] = neg_hash
        batch["query_hash"] = text_ids(queries)
        batch["positive_hash"] = text_ids(positives)
        batch["dataset"] = np.array(datasets, np.int32)
        if self.teacher is not None:
            # Rows of a dataset with "distill": false are not looked up: zero signals, teacher_valid 0.
            use = self._distilled[np.asarray(datasets, np.int64)]
            sel = np.flatnonzero(use)
            tasks = [records[i]["task"] or self.entries[datasets[i]]["task"] for i in sel]
            joined = self.teacher.join([queries[i] for i in sel], tasks, [positives[i] for i in sel],
                                       [records[i]["title"] or None for i in sel],
                                       [kept_negatives[i] for i in sel], self.num_negatives)
            for key, value in joined.items():
                batch[key] = np.zeros((n,) + value.shape[1:], np.float32)
                batch[key][sel] = value
            batch["teacher_valid"] = use.astype(np.float32)
        return batch

    def _produce(self, step, consumed):
        rows, consumed = self.global_rows(step, consumed)
        lo = self.process_index * self.host_batch_size
        hi = lo + self.host_batch_size
        batch = self.build_batch(rows[lo:hi], rows[:lo] + rows[hi:])
        if self.packing:
            batch = self._pack(batch, rows, lo)
        return batch, consumed

    def _pack(self, batch, rows, lo) -> dict:
        """This host's padded batch packed into the row count every host uses (the most rows
        any host's slice needs), its sequences numbered as in the global batch."""
        n_rows = None
        if self._lengths is not None:
            n = self.host_batch_size
            n_rows = self._lengths.packed_rows([rows[p:p + n] for p in range(0, len(rows), n)],
                                               self.row_length, self.row_multiple)
        packed = pack_batch(batch, self.tokenizer.pad_id, row_length=self.row_length, rows=n_rows,
                            row_multiple=self.row_multiple)
        packed["packed_sequence_ids"] = global_sequence_ids(
            packed["packed_sequence_ids"], self.host_batch_size, lo, self.global_batch_size, self.num_negatives)
        return packed

    # ---- iteration with an optional prefetch thread -----------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.prefetch <= 0:
            batch, self._consumed = self._produce(self._step, self._consumed)
        else:
            if self._worker is None:
                self._start_worker()
            item = self._worker[0].get()
            if isinstance(item, BaseException):
                self._stop_worker()
                raise item
            step, batch, self._consumed = item
            assert step == self._step, (step, self._step)
        self._step += 1
        return batch

    def _start_worker(self):
        q, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        step, consumed = self._step, self._consumed.copy()

        def work(step=step, consumed=consumed):
            try:
                while not stop.is_set():
                    batch, consumed = self._produce(step, consumed)
                    while not stop.is_set():
                        try:
                            q.put((step, batch, consumed), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    step += 1
            except BaseException as e:  # handed to the consumer, which re-raises it
                q.put(e)

        thread = threading.Thread(target=work, daemon=True, name="embedder-data")
        thread.start()
        self._worker = (q, stop, thread)
        _LIVE_ITERATORS.add(self)

    def _stop_worker(self):
        if self._worker is not None:
            q, stop, thread = self._worker
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._worker = None

    def close(self):
        self._stop_worker()

    def __del__(self):
        try:
            self._stop_worker()
        except Exception:
            pass


def prepare_datasets(data_config, *, verbose=True):
    """Validates and prepares every dataset of `data_config` (strict errors surface here)."""
    entries = dataset_entries(data_config)
    prepared = []
    for e in entries:
        ds = prepare_dataset(e, data_dir=data_config.data_dir or None, on_bad_record=data_config.on_bad_record,
                             max_text_chars=int(data_config.max_text_chars))
        if ds.skip_counts and verbose:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(ds.skip_counts.items()))
            print(f"data: dataset {e['name']!r}: {len(ds.source)} records, skipped bad records: {counts} "
                  f"(e.g. {sorted(ds.skip_examples.items())[0][1]})")
        prepared.append(ds)
    return entries, prepared


def negatives_per_row(data_config, prepared) -> int:
    """`data_config.num_negatives`, with -1 (as many as the records carry) resolved to the most
    negatives any record of `prepared` has; logs what the records carry and what a row takes."""
    wanted = int(data_config.num_negatives)
    if wanted < -1:
        raise ValueError(f"data_config.num_negatives={wanted} must be >= 0, or -1 for as many as the records carry")
    carried = max((ds.max_negatives for ds in prepared), default=0)
    k = carried if wanted == -1 else wanted
    how = "data.num_negatives=-1: as many as the records carry" if wanted == -1 else f"data.num_negatives={wanted}"
    log.info("data: records carry up to %d hard negative(s); each row takes %d (%s)", carried, k, how)
    if carried > k:
        log.info("data: rows with more than %d negatives keep a seeded random %d of them", k, k)
    return k


def make_train_iterator(data_config, *, tokenizer, prompts, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, row_multiple: int = 8) -> TrainIterator:
    """Prepares the datasets (validation happens here) and returns this host's batch iterator.

    `row_multiple`: with `data_config.packing`, the packed row count is a multiple of it, so the
    rows split evenly over the data-parallel devices (`sharding.host_row_multiple(mesh)`)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if data_config.on_bad_record not in ("strict", "skip"):
        raise ValueError(f"data_config.on_bad_record={data_config.on_bad_record!r}; use 'strict' or 'skip'")
    entries, prepared = prepare_datasets(data_config)
    for ds in prepared:
        log.info("data: dataset %r: %d records, prepared in %s", ds.name, len(ds.source), ds.directory)
    return TrainIterator(prepared, entries, data_config, tokenizer=tokenizer, prompts=prompts,
                         global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                         process_count=process_count, row_multiple=row_multiple,
                         num_negatives=negatives_per_row(data_config, prepared))
