"""Compiles each pod config for its target topology (one at a time) and prints the SCALE.md table rows.

    JAX_PLATFORMS=cpu python launch/scale_table.py [experiments/pod_gemma3_1b.py:prefinetune ...]

Needs the `tpu` extra (libtpu), no TPU. Large models take minutes each on a small CPU machine.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = [f"experiments/pod_gemma3_{size}.py:{stage}" for size in ("1b", "4b", "12b")
           for stage in ("prefinetune", "finetune")]


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("pod_config", REPO_ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def row(spec: str, num_slices: int = 1) -> str:
    from embedder.train import compile_only as co

    config = load_config(spec)
    topo = co.parse_topology(config.topology, num_slices)
    report = co.compile_train_step(config, co.topology_devices(topo), num_slices=num_slices,
                                   topology_name=topo.name, hbm_bytes=topo.hbm_bytes)
    mesh = " x ".join(str(v) for v in report.mesh.values())
    memory = (f"DOES NOT FIT: {report.error}" if report.error else
              f"{co._gib(report.per_device_bytes)} ({co._gib(report.argument_bytes)} + "
              f"{co._gib(report.output_bytes)} - {co._gib(report.alias_bytes)} + {co._gib(report.temp_bytes)})")
    return (f"| `{spec}` | {topo.name} x{num_slices} | {mesh} | {memory} | {co._gib(report.hbm_bytes)} | "
            f"{report.flops['total']:.3e} | {report.compile_seconds:.0f} s |")


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="*", metavar="CONFIG.py:ARG",
                        help=f"pod configs to compile (default: {' '.join(DEFAULT)})")
    parser.add_argument("--num_slices", type=int, default=1)
    args = parser.parse_args(argv)
    for spec in args.specs or DEFAULT:
        if not (REPO_ROOT / spec.partition(":")[0]).is_file():
            parser.error(f"no such config file: {spec.partition(':')[0]}")
        print(row(spec, args.num_slices), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
