"""Train iterator: batch layout, buckets, identity ids, host sharding, mixtures, exact resume."""
import hashlib
import json
import re
import unicodedata

import numpy as np
import pytest

from embedder.data.mixture import MixtureSchedule
from embedder.data.packing import assign_rows, packed_rows
from embedder.data.data_config import default_buckets, default_data_config
from embedder.data.pipeline import make_train_iterator
from embedder.data.prompts import Prompts
from embedder.data.text_identity import text_ids
from embedder.data.tokenizer import ASSETS_DIR, SentencePieceTokenizer

N_A, N_B = 48, 20


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(ASSETS_DIR / "debian_sp8k.model")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    a = [{"query": f"alpha query {i}", "positive": f"alpha document {i} " + "word " * ((i * 7) % 40 if i % 4 == 0 else i % 6),
          "negatives": [f"alpha negative {i}.{j}" for j in range(i % 5)]} for i in range(N_A)]
    a[3]["title"] = "A Title"
    a[5]["task"] = "fact checking"
    b = [{"query": f"beta query {i}", "positive": f"beta document {i}"} for i in range(N_B)]
    b[0]["query"] = b[1]["query"]  # a duplicate query text: equal identity ids
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (d / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
    return d, a, b


def _config(files, **kw):
    d = files[0]
    c = default_data_config()
    c.datasets = [{"name": "a", "files": [str(d / "a.jsonl")], "task": "search result", "weight": 3.0},
                  {"name": "b", "files": [str(d / "b.jsonl")], "task": "classification", "weight": 1.0}]
    c.data_dir = str(d / "tfds")
    c.query_max_length = 16
    c.document_max_length = 48
    c.query_length_buckets = (8, 16)
    c.document_length_buckets = (16, 32, 48)
    c.num_negatives = 3
    c.prefetch = 0
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _it(files, tok, batch=8, seed=0, pi=0, pc=1, **kw):
    return make_train_iterator(_config(files, **kw), tokenizer=tok, prompts=Prompts(), global_batch_size=batch,
                               seed=seed, process_index=pi, process_count=pc)


def _reference_hash(text):
    norm = " ".join(unicodedata.normalize("NFKC", text).split())
    h = hashlib.blake2b(norm.encode(), digest_size=8).digest()
    return [int.from_bytes(h[:4], "big"), int.from_bytes(h[4:], "big")]


def test_identity_ids():
    ids = text_ids(["Hello  world", " Hello world\n", "ｈｅｌｌｏ", "hello", "Hello world", "Hello world!"])
    assert ids.dtype == np.uint32 and ids.shape == (6, 2)
    assert (ids[0] == ids[1]).all() and (ids[0] == ids[4]).all()  # whitespace collapsed
    assert (ids[2] == ids[3]).all()  # NFKC: full-width letters
    assert len({tuple(r) for r in ids[[0, 3, 5]]}) == 3  # case kept, punctuation counts
    assert ids[5].tolist() == _reference_hash("Hello world!")
    many = text_ids([f"text {i}" for i in range(5000)])
    assert len({tuple(r) for r in many}) == 5000


def test_batch_layout_prompts_and_negatives(files, tok):
    it = _it(files, tok, batch=8)
    _, a, b = files
    seen_neg_counts = set()
    for _ in range(12):
        batch = next(it)
        n, k = 8, 3
        shapes = {key: v.shape for key, v in batch.items()}
        lq, ld = shapes["query_ids"][1], shapes["positive_ids"][1]
        assert lq in (8, 16) and ld in (16, 32, 48)
        assert shapes == {"query_ids": (n, lq), "query_mask": (n, lq), "positive_ids": (n, ld),
                          "positive_mask": (n, ld), "negative_ids": (n, k, ld), "negative_mask": (n, k, ld),
                          "negatives_valid": (n, k), "negative_hash": (n, k, 2), "query_hash": (n, 2),
                          "positive_hash": (n, 2), "dataset": (n,)}
        for key in ("query_ids", "query_mask", "positive_ids", "negative_mask", "dataset"):
            assert batch[key].dtype == np.int32
        assert batch["negatives_valid"].dtype == bool and batch["query_hash"].dtype == np.uint32
        # Bucket is the smallest that fits the longest row.
        longest = batch["query_mask"].sum(1).max()
        assert lq == min(x for x in (8, 16) if x >= longest)
        assert len(set(batch["dataset"].tolist())) == 1
        ds = batch["dataset"][0]
        for i in range(n):
            q = tok.decode(batch["query_ids"][i][batch["query_mask"][i] == 1])
            m = re.fullmatch(r"task: (.*?) \| query: (.*)", q)
            assert m, q
            # b[0] and b[1] share a query text: pick the record by its positive.
            [rec] = [r for r in a + b if r["query"] == m[2]
                     and _reference_hash(r["positive"]) == batch["positive_hash"][i].tolist()]
            task = rec.get("task") or ("search result" if ds == 0 else "classification")
            assert m[1] == task
            assert batch["query_hash"][i].tolist() == _reference_hash(rec["query"])
            assert batch["positive_hash"][i].tolist() == _reference_hash(rec["positive"])
            p = tok.decode(batch["positive_ids"][i][batch["positive_mask"][i] == 1])
            assert p.startswith(f"title: {rec.get('title') or 'none'} | text: ")
            negs = rec.get("negatives", [])
            valid = batch["negatives_valid"][i]
            assert valid.tolist() == [j < min(len(negs), k) for j in range(k)]
            seen_neg_counts.add(int(valid.sum()))
            for j in range(k):
                mask = batch["negative_mask"][i, j]
                assert mask.sum() > 0  # even empty slots are real sequences: no 0/0 in pooling
                text = tok.decode(batch["negative_ids"][i, j][mask == 1])
                if valid[j]:
                    assert text[len("title: none | text: "):] in negs
                    assert batch["negative_hash"][i, j].tolist() == _reference_hash(text[20:])
                else:
                    assert text == "title: none | text: " and batch["negative_hash"][i, j].tolist() == [0, 0]
    assert seen_neg_counts == {0, 1, 2, 3}  # a row with 4 negatives keeps 3 (seeded pick)


def test_duplicate_text_same_id_in_batches(files, tok):
    it = _it(files, tok, batch=20, num_negatives=0)
    assert "negative_ids" not in next(it)
    for _ in range(10):
        batch = next(it)
        if batch["dataset"][0] == 1:
            hashes = [tuple(h) for h in batch["query_hash"]]
            assert len(set(hashes)) == 19  # 20 rows, b[0] and b[1] share their query text
            return
    pytest.fail("no batch from dataset b")


def _hosts_batches(files, tok, steps, pc, **kw):
    """Per step, the batches of `pc` simulated hosts of one run."""
    its = [_it(files, tok, pi=pi, pc=pc, **kw) for pi in range(pc)]
    out = [[next(it) for it in its] for _ in range(steps)]
    return out, its


@pytest.mark.parametrize("mode,negatives,batch", [("homogeneous", 3, 8), ("mixed", 1, 12)])
def test_hosts_slices_concatenate_to_the_one_host_batch(files, tok, mode, negatives, batch):
    steps = 10
    kw = dict(batch=batch, seed=3, mode=mode, num_negatives=negatives)
    single, _ = _hosts_batches(files, tok, steps, 1, **kw)
    for pc in (2, 4):
        multi, its = _hosts_batches(files, tok, steps, pc, **kw)
        for step, ([whole], parts) in enumerate(zip(single, multi)):
            for key in whole:
                # Same shapes on every host: the global jax.Array assembly needs it.
                assert {p[key].shape[1:] for p in parts} == {whole[key].shape[1:]}, (pc, step, key)
                assert all(p[key].shape[0] == batch // pc for p in parts)
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key],
                                              err_msg=f"{pc} hosts, step {step}, {key}")
        # Some slice was padded past its own bucket because another host's row was longer.
        def own_bucket(p):
            longest = max(p["positive_mask"].sum(-1).max(), p["negative_mask"].sum(-1).max())
            return min(b for b in (16, 32, 48) if b >= longest)

        assert any(own_bucket(p) < p["positive_ids"].shape[1] for ps in multi for p in ps), pc
        for it in its:
            it.close()


def test_hosts_rows_are_disjoint_and_an_epoch_covers_the_dataset(files, tok):
    # One dataset, 48 records, global batch 8: 6 steps are one epoch of the one global order.
    queries = {0: [], 1: []}
    kw = dict(batch=8, num_negatives=0, datasets=[{"name": "a", "files": [str(files[0] / "a.jsonl")]}])
    multi, its = _hosts_batches(files, tok, 12, 2, **kw)
    for parts in multi[:6]:
        for pi, p in enumerate(parts):
            assert p["query_ids"].shape[0] == 4
            queries[pi] += [tuple(h) for h in p["query_hash"]]
    assert not set(queries[0]) & set(queries[1])
    assert len(queries[0] + queries[1]) == 48
    assert set(queries[0]) | set(queries[1]) == {tuple(_reference_hash(r["query"])) for r in files[1]}
    # Other hosts' records are read for their lengths at most once each (K=0 here): this host
    # tokenised its own 24 records of epoch 1, so at most the other 24 are ever read, however
    # long the run; and fewer, since rows in the top bucket already need no more lengths.
    for it in its:
        for _ in range(12):
            next(it)
    assert all(0 < it._lengths.records_read <= 24 for it in its), [it._lengths.records_read for it in its]
    second = [tuple(h) for parts in multi[6:] for p in parts for h in p["query_hash"]]
    assert second != queries[0] + queries[1] and sorted(second) == sorted(queries[0] + queries[1])


def test_resume_on_another_process_count(files, tok):
    one = _it(files, tok, batch=8, seed=5, mode="mixed", num_negatives=2)
    for _ in range(4):
        next(one)
    state = json.loads(json.dumps(one.get_state()))
    assert "process_count" not in state
    expected = [next(one) for _ in range(3)]
    its = [_it(files, tok, batch=8, seed=5, mode="mixed", num_negatives=2, pi=pi, pc=2) for pi in (0, 1)]
    for it in its:
        it.set_state(state)
    for want in expected:
        parts = [next(it) for it in its]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key], err_msg=key)


def test_all_hosts_pick_the_same_dataset_each_step(files, tok):
    its = [_it(files, tok, batch=8, pi=pi, pc=2, num_negatives=0) for pi in (0, 1)]
    picks = [[int(next(it)["dataset"][0]) for _ in range(16)] for it in its]
    assert picks[0] == picks[1] and set(picks[0]) == {0, 1}


def test_mixture_proportions():
    steps = 20_000
    sched = MixtureSchedule([3.0, 1.0, 0.0], seed=1, mode="homogeneous", batch_size=4)
    rows = np.stack([sched.rows_at(s) for s in range(steps)])
    assert set(map(tuple, rows)) == {(4, 0, 0), (0, 4, 0)}  # one dataset per batch; weight 0 never
    frac = (rows[:, 0] > 0).mean()
    assert abs(frac - 0.75) < 4 * np.sqrt(0.75 * 0.25 / steps)
    np.testing.assert_array_equal(sched.consumed_before(steps), rows.sum(0))
    np.testing.assert_array_equal(sched.consumed_before(1500), rows[:1500].sum(0))
    mixed = MixtureSchedule([1.0, 1.0, 2.0], seed=1, mode="mixed", batch_size=16)
    rows = np.stack([mixed.rows_at(s) for s in range(5000)])
    assert (rows.sum(1) == 16).all()
    labels = np.stack([mixed.labels_at(s) for s in range(5000)])
    np.testing.assert_array_equal(np.stack([np.bincount(x, minlength=3) for x in labels]), rows)
    # Shuffled within the batch: the first half of a batch is not always the first datasets.
    assert (np.diff(labels, axis=1) < 0).any(axis=1).mean() > 0.9
    np.testing.assert_array_equal(sched.labels_at(7), np.full(4, np.flatnonzero(sched.rows_at(7))[0]))
    share = rows.sum(0) / rows.sum()
    np.testing.assert_allclose(share, [0.25, 0.25, 0.5], atol=4 * np.sqrt(0.25 / (16 * 5000)) + 0.002)
    with pytest.raises(ValueError, match="positive sum"):
        MixtureSchedule([0.0, 0.0], 0, "homogeneous", 4)


def test_mixed_mode_batches(files, tok):
    it = _it(files, tok, batch=16, mode="mixed", num_negatives=1)
    ds = np.concatenate([next(it)["dataset"] for _ in range(20)])
    assert 0.6 < (ds == 0).mean() < 0.9  # weights 3:1


@pytest.mark.parametrize("mode,prefetch", [("homogeneous", 0), ("homogeneous", 3), ("mixed", 2)])
def test_save_restore_gives_identical_batches(files, tok, mode, prefetch):
    it = _it(files, tok, batch=8, seed=7, mode=mode, prefetch=prefetch)
    for _ in range(9):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as the checkpoint stores it
    expected = [next(it) for _ in range(7)]
    it.close()
    resumed = _it(files, tok, batch=8, seed=7, mode=mode, prefetch=prefetch)
    next(resumed)  # position elsewhere first: set_state must discard it (and any prefetched batches)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    resumed.close()
    other_seed = _it(files, tok, batch=8, seed=8, mode=mode)
    with pytest.raises(ValueError, match="seed: saved 7 vs now 8"):
        other_seed.set_state(state)


def test_skip_counts_exposed(files, tok, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q1", "positive": "p1"}\n{"query": 1, "positive": "p"}\n\xff\n'
                   '{"query": "q2", "positive": "p2"}\n')
    bad.write_bytes(bad.read_bytes().replace(b"\xc3\xbf", b"\xff"))
    c = _config(files, on_bad_record="skip", data_dir=str(tmp_path / "t"),
                datasets=[{"name": "bad", "files": [str(bad)]}])
    it = make_train_iterator(c, tokenizer=tok, prompts=Prompts(), global_batch_size=2, seed=0)
    assert it.skip_counts == {"wrong_type": 1, "not_utf8": 1}
    assert it.skip_counts_by_dataset == {"bad": {"wrong_type": 1, "not_utf8": 1}}
    assert "skipped bad records: not_utf8=1, wrong_type=1" in capsys.readouterr().out
    c.on_bad_record = "strict"
    from embedder.data.records import BadRecordError

    with pytest.raises(BadRecordError, match=rf"^{bad}:2: 'query' is int"):
        make_train_iterator(c, tokenizer=tok, prompts=Prompts(), global_batch_size=2, seed=0)


def test_config_errors(files, tok):
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        _it(files, tok, batch=8, pc=3)
    with pytest.raises(ValueError, match="use 'strict' or 'skip'"):
        _it(files, tok, on_bad_record="warn")
    with pytest.raises(ValueError, match="datasets is empty"):
        _it(files, tok, datasets=[])
    with pytest.raises(ValueError, match="must equal the max length 16"):
        _it(files, tok, query_length_buckets=(8,))
    with pytest.raises(ValueError, match="names must be unique"):
        _it(files, tok, datasets=[{"name": "x", "files": ["a"]}, {"name": "x", "files": ["b"]}])
    assert default_buckets(256) == (32, 64, 128, 256) and default_buckets(64) == (8, 16, 32, 64)


def _sequences(batch):
    """The token list of every sequence of a padded batch, numbered as `pack_batch` numbers them:
    queries 0..B-1, positives B..2B-1, negatives 2B + b*K + k."""
    groups = [(batch["query_ids"], batch["query_mask"]), (batch["positive_ids"], batch["positive_mask"])]
    if "negative_ids" in batch:
        groups.append((batch["negative_ids"].reshape(-1, batch["negative_ids"].shape[-1]),
                       batch["negative_mask"].reshape(-1, batch["negative_mask"].shape[-1])))
    return [ids[m.astype(bool)].tolist() for all_ids, all_mask in groups for ids, m in zip(all_ids, all_mask)]


@pytest.mark.parametrize("mode, negatives", [("mixed", 3), ("homogeneous", 0)])
def test_packed_batches_hold_the_padded_batches_sequences(files, tok, mode, negatives):
    padded = _it(files, tok, batch=8, seed=5, mode=mode, num_negatives=negatives)
    packed = _it(files, tok, batch=8, seed=5, mode=mode, num_negatives=negatives, packing=True, prefetch=2)
    for step in range(8):   # more than an epoch of dataset b
        want, got = next(padded), next(packed)
        assert not any(k in got for k in ("query_ids", "positive_mask", "negative_ids")), sorted(got)
        rows, length = got["packed_ids"].shape
        assert length == 48 and rows % 8 == 0 and rows >= 1, (step, got["packed_ids"].shape)
        seq_ids, pos = got["packed_sequence_ids"], got["packed_positions"]
        assert seq_ids.shape == pos.shape == (rows, length)
        expected = _sequences(want)
        assert seq_ids.max() < len(expected)
        for i, tokens in enumerate(expected):
            where = seq_ids == i
            # One contiguous run in one row, positions 0..n-1, the padded batch's tokens in order.
            assert got["packed_ids"][where].tolist() == tokens, (step, i)
            assert pos[where].tolist() == list(range(len(tokens))), (step, i)
            assert len(set(np.nonzero(where)[0])) == (1 if tokens else 0), (step, i)
        assert (got["packed_ids"][seq_ids < 0] == tok.pad_id).all()
        for key in set(want) - {"query_ids", "query_mask", "positive_ids", "positive_mask",
                                "negative_ids", "negative_mask"}:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got["negatives_valid"].shape == (8, negatives)
    assert packed.get_state() == padded.get_state()
    packed.close()


@pytest.mark.parametrize("negatives, row_multiple", [(3, 1), (0, 8)])
def test_two_hosts_pack_into_one_row_count_with_global_sequence_ids(files, tok, negatives, row_multiple):
    """Each host packs its own slice, into `packed_rows` of the most rows either slice needs, and
    numbers its sequences as the global batch does: together they hold the 1-process batch."""
    kw = dict(batch=8, seed=5, mode="mixed", num_negatives=negatives)
    whole = _it(files, tok, **kw)
    padded = [_it(files, tok, pi=p, pc=2, **kw) for p in (0, 1)]
    packed = [make_train_iterator(_config(files, mode="mixed", num_negatives=negatives, packing=True),
                                  tokenizer=tok, prompts=Prompts(), global_batch_size=8, seed=5,
                                  process_index=p, process_count=2, row_multiple=row_multiple) for p in (0, 1)]
    n, k, needs = 4, negatives, set()
    for step in range(8):   # more than an epoch of dataset b
        expected = dict(enumerate(_sequences(next(whole))))
        hosts, got = [next(it) for it in padded], [next(it) for it in packed]
        needed = []
        for p, (want, g) in enumerate(zip(hosts, got)):
            mine = _sequences(want)
            row, _ = assign_rows([len(s) for s in mine], 48)
            needed.append(int(row.max()) + 1)
            # Host p's local sequence i -> its global id (queries, positives, negatives b*K+k).
            ids = [p * n + i for i in range(n)] + [8 + p * n + i for i in range(n)] + \
                  [16 + p * n * k + j for j in range(n * k)]
            seq_ids = g["packed_sequence_ids"]
            assert sorted(np.unique(seq_ids[seq_ids >= 0]).tolist()) == ids, (step, p)
            for i, tokens in zip(ids, mine):
                assert g["packed_ids"][seq_ids == i].tolist() == tokens == expected[i], (step, p, i)
            for key in set(want) - {"query_ids", "query_mask", "positive_ids", "positive_mask",
                                    "negative_ids", "negative_mask"}:
                np.testing.assert_array_equal(g[key], want[key], err_msg=key)
        needs.add(needed[0] != needed[1])
        shape = (packed_rows(max(needed), row_multiple), 48)
        assert got[0]["packed_ids"].shape == got[1]["packed_ids"].shape == shape, (step, needed)
        assert got[0]["packed_positions"].shape == got[1]["packed_sequence_ids"].shape == shape
    assert True in needs   # some step's hosts needed different row counts
