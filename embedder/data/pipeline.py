"""The training input pipeline: prepared datasets -> host-local, bucketed, tokenised batches.

`make_train_iterator(data_config, tokenizer=..., prompts=..., global_batch_size=..., seed=...)`
returns a `TrainIterator` whose batches follow ARCHITECTURE.md "Batches" (numpy, this host's
rows) and whose `get_state()`/`set_state()` make a resumed run see exactly the same batches.

`data_config` (an `ml_collections.ConfigDict`; start from `default_data_config()`):

    datasets            list of dicts, one per mixture component:
                          name     str, unique; shows up in metrics and in `batch["dataset"]` order
                          builder  "jsonl" (default when `files` is set) | "beir" | "debian"
                          files    list of .jsonl / .jsonl.gz paths            (jsonl)
                          path     BEIR folder (corpus, queries, qrels/)       (beir)
                                   or the Debian train_pairs file              (debian, optional)
                          split    qrels split for BEIR, default "train"
                          task     task string for the query prompt, default "search result";
                                   a record's own "task" field wins
                          weight   mixture weight (>= 0), default 1.0
    mode                "homogeneous": each global batch from one dataset, drawn by weight
                        (fine-tuning); "mixed": rows from all datasets in one batch (pre-finetuning)
    query_max_length    tokens per query, prompt and special tokens included (the text is cut)
    document_max_length tokens per positive / negative
    query_length_buckets, document_length_buckets
                        padded lengths; a batch side is padded to the smallest bucket that fits,
                        so the step compiles at most len(q) * len(d) times. Empty -> powers of two
                        from max_length / 8 up to max_length. Positives and negatives share a bucket.
    num_negatives       K hard negatives per row; rows with fewer get `negatives_valid=False` slots
                        (a record with more keeps a seeded random K)
    on_bad_record       "strict": stop before training with `FILE:LINE: problem (fix)`;
                        "skip": skip bad records, count them per reason (`iterator.skip_counts`)
    max_text_chars      a longer query / positive / negative / title is a bad record
    data_dir            where prepared array_record datasets live ("" -> $TFDS_DATA_DIR or
                        ~/tensorflow_datasets); the train loop may point it into the workdir
    shuffle             shuffle each host's shard, reshuffled every epoch (seeded)

Each host reads only its contiguous shard of every dataset (`len // process_count` records,
grain `ShardOptions(process_index, process_count, drop_remainder=True)`). The iterator state
is the number of batches handed out so far (plus a fingerprint of the data setup), so
`get_state()` must be taken when the batches of the completed steps have been consumed and
no more. With a shared `data_dir`, prepare datasets once (one host, or ahead of the job)
before many hosts open them.
    prefetch            batches built ahead on a background thread (0 = build on demand)
"""
from __future__ import annotations

import atexit
import collections
import queue
import threading
import weakref

import grain
import ml_collections
import numpy as np

from embedder.data.builders import prepare_dataset
from embedder.data.mixture import MixtureSchedule
from embedder.data.prompts import DEFAULT_TASK, Prompts
from embedder.data.tokenizer import pad_batch
from embedder.data.text_identity import text_ids

STATE_VERSION = 1
# Prefetch threads must stop before interpreter teardown: a daemon thread killed inside the
# tokenizer's or array_record's C++ code aborts the process ("terminate called ...").
_LIVE_ITERATORS: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()


@atexit.register
def _stop_all_workers():
    for it in list(_LIVE_ITERATORS):
        it.close()


def default_data_config() -> ml_collections.ConfigDict:
    """The shipped Debian pairs, retrieval prompts, no hard negatives, strict validation."""
    c = ml_collections.ConfigDict()
    c.datasets = [{"name": "debian", "builder": "debian", "task": DEFAULT_TASK, "weight": 1.0}]
    c.mode = "homogeneous"
    c.query_max_length = 64
    c.document_max_length = 256
    c.query_length_buckets = ()
    c.document_length_buckets = ()
    c.num_negatives = 0
    c.on_bad_record = "strict"
    c.max_text_chars = 100_000
    c.data_dir = ""
    c.shuffle = True
    c.prefetch = 2
    return c


def default_buckets(max_length: int) -> tuple[int, ...]:
    buckets, b = [], max(8, max_length // 8)
    while b < max_length:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (max_length,)


def _buckets(given, max_length: int, name: str) -> tuple[int, ...]:
    if not given:
        return default_buckets(max_length)
    buckets = tuple(sorted(int(b) for b in given))
    if buckets[0] <= 0 or buckets[-1] != max_length:
        raise ValueError(f"data_config.{name}={list(given)}: buckets must be positive and the largest "
                         f"must equal the max length {max_length} (add {max_length})")
    return buckets


def _entries(data_config) -> list[dict]:
    entries = [dict(e) for e in (data_config.datasets or [])]
    if not entries:
        raise ValueError("data_config.datasets is empty; add at least one {name, files|builder, task, weight}")
    names = [e.get("name") for e in entries]
    for i, e in enumerate(entries):
        if not e.get("name"):
            raise ValueError(f"data_config.datasets[{i}] has no 'name'; give every dataset a unique name")
        e.setdefault("weight", 1.0)
        e.setdefault("task", DEFAULT_TASK)
    dupes = [n for n, c in collections.Counter(names).items() if c > 1]
    if dupes:
        raise ValueError(f"data_config.datasets names must be unique; repeated: {dupes}")
    return entries


def _derive_seed(*parts) -> int:
    """A 32-bit seed (what grain accepts) from several integers."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _host_stream(source, process_index, process_count, shuffle, seed, name):
    """Infinite, seeded stream of this host's shard of one dataset (random access by position)."""
    shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
    n = len(source)
    per_host = n // shard.shard_count
    if per_host == 0:
        raise ValueError(f"dataset {name!r} has {n} records, fewer than process_count={process_count}; "
                         "every host needs at least one record")
    start = shard.shard_index * per_host
    ds = grain.MapDataset.source(source)[start:start + per_host]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(None), per_host


class TrainIterator:
    """Host-local batches of a task mixture; exact save/restore via `get_state`/`set_state`."""

    def __init__(self, datasets, entries, data_config, *, tokenizer, prompts, global_batch_size, seed,
                 process_index=0, process_count=1):
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count="
                             f"{process_count}; pick a multiple of {process_count}")
        self.tokenizer = tokenizer
        self.prompts = prompts if isinstance(prompts, Prompts) else Prompts.from_spec(prompts)
        self.entries = entries
        self.dataset_names = [e["name"] for e in entries]
        self.global_batch_size = int(global_batch_size)
        self.host_batch_size = self.global_batch_size // process_count
        self.seed, self.process_index, self.process_count = int(seed), process_index, process_count
        self.mode = data_config.mode
        self.num_negatives = int(data_config.num_negatives)
        if self.num_negatives < 0:
            raise ValueError(f"data_config.num_negatives={self.num_negatives} must be >= 0")
        self.query_max_length = int(data_config.query_max_length)
        self.document_max_length = int(data_config.document_max_length)
        self.query_buckets = _buckets(data_config.query_length_buckets, self.query_max_length,
                                      "query_length_buckets")
        self.document_buckets = _buckets(data_config.document_length_buckets, self.document_max_length,
                                         "document_length_buckets")
        self.schedule = MixtureSchedule([float(e["weight"]) for e in entries], self.seed, self.mode,
                                        self.host_batch_size, process_index, process_count)
        self._streams, self.shard_sizes = [], []
        for i, ds in enumerate(datasets):
            stream, size = _host_stream(ds.source, process_index, process_count, bool(data_config.shuffle),
                                        _derive_seed(self.seed, i), ds.name)
            self._streams.append(stream)
            self.shard_sizes.append(size)
        self.dataset_sizes = [len(ds.source) for ds in datasets]
        self.skip_counts_by_dataset = {ds.name: dict(ds.skip_counts) for ds in datasets}
        total = collections.Counter()
        for counts in self.skip_counts_by_dataset.values():
            total.update(counts)
        self.skip_counts = dict(total)
        self.prefetch = int(data_config.prefetch)
        self._step = 0
        self._consumed = np.zeros(len(entries), np.int64)
        self._worker = None

    # ---- state -------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"datasets": self.dataset_names, "dataset_sizes": self.dataset_sizes,
                "weights": [float(e["weight"]) for e in self.entries], "seed": self.seed, "mode": self.mode, "global_batch_size": self.global_batch_size,
                "process_count": self.process_count}

    def get_state(self) -> dict:
        """JSON-able; identical on every host (the schedule is global, positions derive from it)."""
        return {"version": STATE_VERSION, "step": self._step, **self._fingerprint()}

    def set_state(self, state: dict):
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state {state!r} is not a version-{STATE_VERSION} state "
                             "from TrainIterator.get_state()")
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
    def _rows(self, step, consumed):
        """[(dataset index, position in its host stream)] for `step`, and the updated counters."""
        take = self.schedule.rows_at(step)
        rows = [(d, int(consumed[d]) + j) for d in range(len(take)) for j in range(int(take[d]))]
        return rows, consumed + take

    def _negatives(self, record, d, pos):
        negs = record["negatives"]
        k = self.num_negatives
        if len(negs) > k:
            rng = np.random.default_rng([self.seed, 0x6E6567, d, pos])
            negs = [negs[i] for i in sorted(rng.choice(len(negs), size=k, replace=False))]
        return negs

    def build_batch(self, rows) -> dict:
        """Tokenises and pads the records at `rows` [(dataset, position)] into one host batch."""
        records = [None] * len(rows)
        by_dataset = collections.defaultdict(list)
        for i, (d, pos) in enumerate(rows):
            by_dataset[d].append((i, pos))
        for d, items in by_dataset.items():
            stream = self._streams[d]
            # Batched reads let array_record fetch in parallel (~25% faster than one by one);
            # `_getitems` is grain's batched path, fall back to plain indexing without it.
            getitems = getattr(stream, "_getitems", None)
            positions = [pos for _, pos in items]
            fetched = getitems(positions) if getitems else [stream[p] for p in positions]
            for (i, _), record in zip(items, fetched):
                records[i] = record
        q_prefix = [self.prompts.query_prefix(r["task"] or self.entries[d]["task"])
                    for r, (d, _) in zip(records, rows)]
        d_prefix = [self.prompts.document_prefix(r["title"] or None) for r in records]
        queries = [r["query"] for r in records]
        positives = [r["positive"] for r in records]
        q_tok = self.tokenizer.encode(queries, self.query_max_length, q_prefix)
        doc_texts, doc_prefix = list(positives), list(d_prefix)
        batch = {}
        if self.num_negatives:
            k = self.num_negatives
            valid = np.zeros((len(rows), k), bool)
            neg_hash = np.zeros((len(rows), k, 2), np.uint32)
            empty_prefix = self.prompts.document_prefix(None)
            for i, (r, (d, pos)) in enumerate(zip(records, rows)):
                negs = self._negatives(r, d, pos)
                valid[i, :len(negs)] = True
                if negs:
                    neg_hash[i, :len(negs)] = text_ids(negs)
                # Empty slots get a real (prompt-only) sequence so pooling never divides by zero;
                # negatives_valid=False tells the loss to ignore them.
                doc_texts += negs + [""] * (k - len(negs))
                doc_prefix += [empty_prefix] * k
        doc_tok = self.tokenizer.encode(doc_texts, self.document_max_length, doc_prefix)
        n = len(rows)
        q_ids, q_mask = pad_batch(q_tok, self.tokenizer.pad_id, self.query_buckets)
        d_ids, d_mask = pad_batch(doc_tok, self.tokenizer.pad_id, self.document_buckets)
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
        batch["dataset"] = np.array([d for d, _ in rows], np.int32)
        return batch

    def _produce(self, step, consumed):
        rows, consumed = self._rows(step, consumed)
        return self.build_batch(rows), consumed

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
    entries = _entries(data_config)
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


def make_train_iterator(data_config, *, tokenizer, prompts, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """Prepares the datasets (validation happens here) and returns this host's batch iterator."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if data_config.on_bad_record not in ("strict", "skip"):
        raise ValueError(f"data_config.on_bad_record={data_config.on_bad_record!r}; use 'strict' or 'skip'")
    entries, prepared = prepare_datasets(data_config)
    return TrainIterator(prepared, entries, data_config, tokenizer=tokenizer, prompts=prompts,
                         global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                         process_count=process_count)
