"""Where our train step's time goes: a jax.profiler trace of one step, summed per HLO op.

    .venv/bin/python bench/profile_step.py --length 64 --dtype float32 [--top 30] [--trace-dir DIR]
    .venv/bin/python bench/profile_step.py --forward --length 128      # one encode forward instead
    .venv/bin/python bench/profile_step.py --packing --length 64       # the step on packed rows
    .venv/bin/python bench/profile_step.py --instructions 20           # + the 20 costliest HLO instructions
    .venv/bin/python bench/profile_step.py --model gemma3-270m --batch 32 --query-length 32 --length 128 --packing

Builds the same step as `train_step.py` (`--model`, default all-MiniLM-L6-v2; `--batch` triples,
MRL + one hard negative), runs two warm-up steps, traces one, and prints the thread time of each
executed op (thunk) grouped two ways: by kind (matmul fusions, elementwise fusions,
copies, ...) and by the model operation XLA names in its metadata (e.g.
`encoder/layer_N/mlp/up`). Thread times add up over the CPU threads that ran ops,
so shares are the meaningful number; on a loaded machine every op stretches alike.
Caveat: with the CPU tuning's default (YNNPACK fusions off) XLA's own dot thunks do not
all show up as trace events, so the tables under-count the projection matmuls (the printed
wall time says how much is missing); `EMBEDDER_XLA_CPU_DEFAULTS=0` profiles the YNNPACK build,
where every fusion is an event.
`--forward` traces one encoder forward of `--batch` shipped Debian descriptions padded
to `--length` (what `Embedder.encode` runs per chunk) instead of a train step.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
import tempfile
import time

import measure  # noqa: F401  (sets the environment before JAX is imported)

import bench_models
import train_step


def op_metadata(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the op_name XLA keeps in its metadata (the traced JAX op)."""
    meta = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        meta[m.group(1)] = m.group(2)
    return meta


def op_times(trace_dir: pathlib.Path) -> collections.Counter:
    """Thread nanoseconds per executed op name in the newest trace under `trace_dir`."""
    import jax

    files = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no trace written under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    times = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                # Per-op events; skip the executor's own spans, which contain them.
                if event.name.startswith(("ThunkExecutor", "Slinky", "$")) or "Execute" in event.name:
                    continue
                if re.search(r"fusion|copy|dot|while|call|transpose|wrapped|reduce|select", event.name):
                    times[event.name] += event.duration_ns
    return times


def kind_of(op: str) -> str:
    kind = re.sub(r"\.\d+$", "", op)
    return "matmul (ynn/xnn/onednn fusion)" if re.match(r"(ynn|xnn|onednn)_fusion$", kind) else kind


def model_op(name: str, meta: dict[str, str]) -> str:
    op = meta.get(name, "?")
    op = re.sub(r"layer_\d+", "layer_N", op)
    op = re.sub(r"^jit\([^)]*\)/", "", op)
    return re.sub(r"/(jit\(\w+\)/)+", "/", op)[:100]


def table(title: str, counts: collections.Counter, top: int) -> str:
    total = sum(counts.values()) or 1
    lines = [f"{title} (thread time, share)"]
    for key, ns in counts.most_common(top):
        lines.append(f"  {ns / 1e9:8.3f} s {100 * ns / total:5.1f}%  {key}")
    return "\n".join(lines)


def instructions(hlo_text: str, times: collections.Counter, top: int) -> str:
    """The `top` most expensive executed instructions: thread time, result shape and operands,
    and the traced op from the metadata (e.g. which gradient a `reduce-window` sums)."""
    total = sum(times.values()) or 1
    meta = op_metadata(hlo_text)
    lines = [f"top {top} instructions (thread time, share, result <- operands, traced op)"]
    for name, ns in times.most_common(top):
        m = re.search(r"^\s*(?:ROOT )?%" + re.escape(name) + r" = (\S+) \w+\(([^)]*)\)", hlo_text, re.M)
        shape, operands = (m.group(1), m.group(2)[:120]) if m else ("?", "")
        lines.append(f"  {ns / 1e6:8.1f} ms {100 * ns / total:5.1f}%  {name} {shape} <- {operands}"
                     f"  [{model_op(name, meta)}]")
    return "\n".join(lines)


class Forward:
    """One compiled encoder forward over `batch` Debian descriptions padded to `length`."""

    def __init__(self, model_name: str, dtype: str, length: int, batch: int):
        from embedder.data.tokenizer import pad_batch
        from embedder.inference import Embedder, precast_params

        model = Embedder.load(str(bench_models.get(model_name).ours), config_overrides={"dtype": dtype})
        seqs = model.tokenizer.encode(measure.debian_texts(batch), max_length=length)
        ids, mask = pad_batch(seqs, model.tokenizer.pad_id, buckets=(length,), max_length=length)
        self.args = (precast_params(model.model, model.params, dtype), ids, mask)   # as encode runs it
        self.step = model._apply.lower(*self.args).compile()

    def __call__(self):
        import jax

        jax.block_until_ready(self.step(*self.args))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", choices=bench_models.NAMES)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--query-length", type=int, default=0, help="query max length (0: the length)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace-dir", default="", help="keep the trace here (TensorBoard / Perfetto)")
    p.add_argument("--forward", action="store_true", help="trace one encode forward instead of a train step")
    p.add_argument("--packing", action="store_true", help="the train step on packed rows (data.packing)")
    p.add_argument("--instructions", type=int, default=0, metavar="N",
                   help="also list the N most expensive HLO instructions with shapes and operands")
    args = p.parse_args(argv)
    import jax

    if args.forward:
        step = Forward(args.model, args.dtype, args.length, args.batch)
    else:
        step = train_step.contestant("ours_packed" if args.packing else "ours", bench_models.get(args.model),
                                     args.dtype, args.length, args.query_length or args.length,
                                     train_step.triples(args.batch), args.batch)
    step(), step()
    trace_dir = pathlib.Path(args.trace_dir or tempfile.mkdtemp(prefix="embedder-profile-"))
    with jax.profiler.trace(str(trace_dir)):
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    times = op_times(trace_dir)
    meta = op_metadata(step.step.as_text())
    by_kind, by_op = collections.Counter(), collections.Counter()
    for name, ns in times.items():
        by_kind[kind_of(name)] += ns
        by_op[f"{kind_of(name)}: {model_op(name, meta)}"] += ns
    what = "encode forward" if args.forward else "train step"
    print(f"{args.model} seq {args.length} {args.dtype}, batch {args.batch}: {sum(times.values()) / 1e9:.2f} s of op "
          f"thread time in one {what} of {wall:.2f} s wall; trace in {trace_dir}")
    print(table("by kind", by_kind, args.top))
    print(table("by model op", by_op, args.top))
    if args.instructions:
        print(instructions(step.step.as_text(), times, args.instructions))
    return 0


if __name__ == "__main__":
    measure.tune()
    sys.exit(main())
