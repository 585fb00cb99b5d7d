"""Train step: embedder vs sentence-transformers on the same weights, interleaved.

    .venv/bin/python bench/train_step.py --lengths 64,128 --reps 5 --out train.json
    .venv/bin/python bench/train_step.py --packing off        # padded batches only
    .venv/bin/python bench/train_step.py --model gemma3-270m --batch 32 --query-length 32 \
        --lengths 128 --dtypes float32 --packing on --isolate --reps 3

Both sides take one step of AdamW on MatryoshkaLoss over MultipleNegativesRankingLoss
(scale 20 = temperature 0.05, one hard negative, every row's positives and hard negatives as
candidates) for `--batch` (query, positive, negative) triples of shipped Debian pairs; queries
truncated to `--query-length` (default: the length), documents to the length. Models
(`bench_models.py`): all-MiniLM-L6-v2 (dims 384/256/128/64), the real Gemma 3 270M or its tiny
twin (dims D, D/2, D/4; the embedding table frozen on both sides). f32, and bf16 compute with
f32 master weights (ours: config dtype="bfloat16"; sentence-transformers: torch.autocast bf16).
`--packing on` runs our step on the triples packed into rows of the length (one encoder call).
`--isolate` runs every contestant in its own process, alternating (A, B, A, B, ...), so each
process's peak RSS (VmHWM) is that contestant's alone; `run_all.py` uses it, and comparisons should:
sharing one process (and one malloc arena) with torch made our step bimodal on a 2-core AMD EPYC,
10 s in some processes and 20-35 s in others (bench/README.md). Without it all share this process and the
memory column is the RSS one step adds on top of what was resident.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import measure  # noqa: F401  (sets the environment before JAX is imported)

import numpy as np

import bench_models
import flops

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
    """Our jitted, donated train step on one device, assembled as the trainer does (`build_run`)."""

    def __init__(self, model: bench_models.BenchModel, dtype: str, length: int, query_length: int,
                 texts, batch: int, packing: bool = False, remat: str = "none", grad_cache: int = 0):
        import jax
        from ml_collections import ConfigDict

        from embedder import sharding
        from embedder.data.packing import pack_batch
        from embedder.data.tokenizer import length_buckets, load_tokenizer, pad_batch
        from embedder.model import ModelConfig
        from embedder.model_store import load_model
        from embedder.train.config import base_config
        from embedder.train.setup import build_run
        from embedder.train.state import TrainState

        params, spec = load_model(model.ours)
        self.config = ModelConfig.from_dict(dict(spec["model"], dtype=dtype, remat=remat))
        tok = load_tokenizer(spec["tokenizer"])
        q = tok.encode(texts[0], max_length=query_length)
        p, n = (tok.encode(t, max_length=length) for t in texts[1:])
        self.real_tokens = sum(len(s) for s in q + p + n)
        self.lengths = [len(s) for s in q + p + n]
        batch_np = {}
        for name, seqs, max_len in (("query", q, query_length), ("positive", p, length), ("negative", n, length)):
            ids, mask = pad_batch(seqs, tok.pad_id, buckets=length_buckets(max_len, per_octave=4),
                                  max_length=max_len)
            batch_np[f"{name}_ids"], batch_np[f"{name}_mask"] = ids, mask
        self.padded_tokens = sum(v.size for k, v in batch_np.items() if k.endswith("_ids"))
        batch_np["negative_ids"] = batch_np["negative_ids"][:, None]
        batch_np["negative_mask"] = batch_np["negative_mask"][:, None]
        batch_np["negatives_valid"] = np.ones((batch, 1), bool)
        batch_np["query_hash"], batch_np["positive_hash"] = _hash(texts[0]), _hash(texts[1])
        batch_np["negative_hash"] = _hash(texts[2])[:, None]
        if packing:
            batch_np = pack_batch(batch_np, tok.pad_id, row_length=length, row_multiple=1)
            self.padded_tokens = int(batch_np["packed_ids"].size)
        config = base_config()
        config.batch_size, config.total_steps, config.grad_cache_chunks = batch, 1000, grad_cache
        config.model = ConfigDict(self.config.to_dict())
        config.data.query_max_length = query_length
        config.loss.update({"dims": model.dims, "temperature": TEMPERATURE, "global_hard_negatives": True,
                            "mask_duplicates": False})
        config.optimizer.update({"learning_rate": LR, "warmup_steps": 0, "schedule": "constant",
                                 "weight_decay": WEIGHT_DECAY, "grad_clip_norm": 0.0, "frozen": model.frozen})
        run = build_run(config, jax.devices()[:1])
        with jax.set_mesh(run.mesh):
            params = jax.device_put(params, run.state_shardings.params)
            state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                               opt_state=run.optimizer.init(params))
            self.state = jax.device_put(state, run.state_shardings)
            self.batch = sharding.host_to_global(batch_np, run.mesh)
            self.step = run.step.lower(self.state, self.batch, jax.random.key(0)).compile()
        del params
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

    def __init__(self, model: bench_models.BenchModel, dtype: str, length: int, query_length: int, texts):
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (MatryoshkaLoss,
                                                                        MultipleNegativesRankingLoss)

        torch.manual_seed(0)
        self.torch = torch
        self.model = SentenceTransformer(str(model.hf), device="cpu")
        self.loss_fn = MatryoshkaLoss(self.model, MultipleNegativesRankingLoss(self.model, scale=1 / TEMPERATURE),
                                   matryoshka_dims=list(model.dims))
        for name, param in self.model.named_parameters():
            if any(s in name for s in model.torch_frozen):
                param.requires_grad_(False)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=LR, weight_decay=WEIGHT_DECAY)
        self.features = []
        for max_len, part in ((query_length, texts[0]), (length, texts[1]), (length, texts[2])):
            self.model.max_seq_length = max_len
            prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
            self.features.append(prepare(part))
        self.padded_tokens = sum(int(f["input_ids"].numel()) for f in self.features)
        self.real_tokens = sum(int(f["attention_mask"].sum()) for f in self.features)
        self.bf16 = dtype == "bfloat16"
        self.model.train()

    def __call__(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            loss = self.loss_fn([dict(f) for f in self.features], None)
        loss.backward()
        self.opt.step()
        self.loss = float(loss.detach())


def contestant(name: str, model, dtype: str, length: int, query_length: int, texts, batch: int,
               remat: str = "none", grad_cache: int = 0):
    if name == "st":
        return SentenceTransformersStep(model, dtype, length, query_length, texts)
    return Ours(model, dtype, length, query_length, texts, batch, packing=name == "ours_packed", remat=remat,
                grad_cache=grad_cache)


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM) so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    """One contestant alone in this process: load, one warm-up step, `--steps` timed steps."""
    model = bench_models.get(args.model)
    texts = triples(args.batch)
    t0 = time.perf_counter()
    c = contestant(args.worker, model, args.dtypes, int(args.lengths), args.query_length or int(args.lengths),
                   texts, args.batch, args.remat, args.grad_cache)
    c()
    setup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        c()
        times.append(time.perf_counter() - t0)
    return {"name": args.worker, "seconds": times, "setup_and_first_step_s": setup_s,
            "peak_rss_bytes": peak_rss_bytes(), "real_tokens": c.real_tokens, "padded_tokens": c.padded_tokens,
            "loss": c.loss, "xla_temp_bytes": getattr(c, "xla_temp_bytes", None),
            "lengths": getattr(c, "lengths", None), "load_average": measure.load_average()}


def run_isolated(model_name: str, length: int, query_length: int, dtype: str, reps: int, batch: int,
                 names: list[str], steps: int, remat: str = "none", grad_cache: int = 0, log=print) -> dict:
    """Each contestant in its own process, alternating; per rep the median of `steps` steps."""
    per: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(reps):
            for name in names:
                out = f"{tmp}/{name}-{r}.json"
                subprocess.run([sys.executable, __file__, "--worker", name, "--model", model_name,
                                "--lengths", str(length), "--query-length", str(query_length),
                                "--dtypes", dtype, "--batch", str(batch), "--steps", str(steps), "--remat", remat,
                                "--grad-cache", str(grad_cache),
                                "--out", out], check=True, env=measure.peer_env() if name == "st" else None)
                with open(out) as f:
                    per[name].append(json.load(f))
                res = per[name][-1]
                log(f"  rep {r + 1}/{reps} {name:<12s} step {statistics.median(res['seconds']):7.2f} s  "
                    f"peak RSS {res['peak_rss_bytes'] / 2**30:5.2f} GiB  load {res['load_average'][0]}")
    times = {n: [statistics.median(x["seconds"]) for x in v] for n, v in per.items()}
    first = {n: v[0] for n, v in per.items()}
    return {"times": times, "first": first,
            "peak_rss_gib": {n: round(max(x["peak_rss_bytes"] for x in v) / 2**30, 2) for n, v in per.items()}}


def run(lengths: list[int], dtypes: list[str], reps: int, batch: int, log=print,
        packing: tuple[bool, ...] = (False, True), model_name: str = "minilm", query_length: int = 0,
        isolate: bool = False, steps: int = 2, remat: str = "none", grad_cache: int = 0) -> dict:
    model = bench_models.get(model_name)
    texts = triples(batch)
    result = {"model": model_name, "batch": batch, "isolate": isolate, "remat": remat,
              "grad_cache": grad_cache, "cpu": measure.cpu_info(),
              "configs": {}}
    ours_names = ["ours_packed" if p else "ours" for p in packing]
    for length in lengths:
        qlen = query_length or length
        for dtype in dtypes:
            if isolate:
                iso = run_isolated(model_name, length, qlen, dtype, reps, batch, ["st", *ours_names], steps, remat,
                                   grad_cache, log)
                times, first = iso["times"], iso["first"]
                real = first[ours_names[0]]["real_tokens"]
                padded = {n: f["padded_tokens"] for n, f in first.items()}
                memory = {"peak_rss_gib": iso["peak_rss_gib"]}
                xla_temp = {n: first[n]["xla_temp_bytes"] for n in ours_names}
                losses = {n: f["loss"] for n, f in first.items()}
                seq_lengths = first[ours_names[0]]["lengths"]
            else:
                contestants = {n: contestant(n, model, dtype, length, qlen, texts, batch, remat, grad_cache)
                               for n in ours_names}
                st = SentenceTransformersStep(model, dtype, length, qlen, texts)
                peaks = {n: 0 for n in ["st", *contestants]}

                def timed(name, fn):
                    def call():
                        with measure.RssPeak() as rss:
                            fn()
                        peaks[name] = max(peaks[name], rss.peak - rss.before)
                    return call

                st()  # warm-up: first-call allocations
                for c in contestants.values():
                    c()
                runs = {"st": timed("st", st)}
                runs.update({n: timed(n, c) for n, c in contestants.items()})
                times = measure.interleave(runs, reps, log)
                ours = next(iter(contestants.values()))
                real, seq_lengths = ours.real_tokens, ours.lengths
                padded = dict({n: c.padded_tokens for n, c in contestants.items()}, st=st.padded_tokens)
                memory = {"step_rss_peak_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()}}
                xla_temp = {n: c.xla_temp_bytes for n, c in contestants.items()}
                losses = dict({n: c.loss for n, c in contestants.items()}, st=st.loss)
                del ours, st, contestants
            log(f"seq {length} (queries {qlen}) {dtype}: real tokens {real}, padded {padded}")
            cfg = bench_models.model_config(model)
            result["configs"][f"{length}/{dtype}"] = {
                "seq": length, "query_length": qlen, "dtype": dtype, "real_tokens": real,
                "padded_tokens": padded, "model_flops_real": flops.total_flops(cfg, seq_lengths, train=True),
                "seconds": {k: measure.summary(v) for k, v in times.items()},
                **{f"ratio_{n}_vs_st" if n != "ours" else "ratio_vs_st":
                   measure.summary([s / o for s, o in zip(times["st"], times[n])]) for n in ours_names},
                **memory,
                "xla_temp_mib": {n: round(v / 2**20, 1) if v else None for n, v in xla_temp.items()},
                "loss_after": losses, "load_average": measure.load_average()}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", choices=bench_models.NAMES)
    p.add_argument("--lengths", default="64,128", help="document (and default query) max lengths")
    p.add_argument("--query-length", type=int, default=0, help="query max length (0: the length)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--packing", default="off,on",
                   help="our step on padded batches (off), packed rows (on), or both (off,on)")
    p.add_argument("--isolate", action="store_true", help="one process per contestant and repetition")
    p.add_argument("--steps", type=int, default=2, help="with --isolate: timed steps per process (median)")
    p.add_argument("--remat", default="none", help="our model's remat policy: none, full, dots_saveable")
    p.add_argument("--grad-cache", type=int, default=0, help="our step's gradient-cache chunks (0: off)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.worker:
        res = worker(args)
    else:
        modes = args.packing.split(",")
        if not modes or set(modes) - {"off", "on"}:
            p.error(f"--packing takes off, on or off,on; got {args.packing!r}")
        res = run([int(x) for x in args.lengths.split(",")], args.dtypes.split(","), args.reps, args.batch,
                  packing=tuple(m == "on" for m in modes), model_name=args.model,
                  query_length=args.query_length, isolate=args.isolate, steps=args.steps,
                  remat=args.remat, grad_cache=args.grad_cache)
        print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    measure.tune()
    sys.exit(main())
