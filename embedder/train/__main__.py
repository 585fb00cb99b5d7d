"""`python -m embedder.train --config experiments/NAME.py[:ARG] --workdir DIR [--config.x=v ...]`.

Trains (or resumes) the experiment in DIR. With `--compile_only` it builds the
mesh, ahead-of-time compiles the train step and reports its memory instead.
`--print_config` prints every config field with its value (overrides applied) as
the `--config.FIELD=VALUE` flags that set it, and exits. Fine-tune any model on
your JSONL pairs:

    python -m embedder.train --config experiments/finetune.py:MODEL --config.data.datasets=pairs.jsonl --workdir DIR
"""

from __future__ import annotations

import re
import sys

from absl import app, flags
from ml_collections import config_flags

from embedder import cpu_tuning

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, `path.py` or `path.py:ARG`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, checkpoints, metrics, eval.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "AOT-compile the train step, print its memory use and FLOPs, and exit.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "With --compile_only: a TPU topology such as v5e:4x4 or v5p:4x4x4 (needs the tpu extra); "
    "default: the config's `topology` field (the pod configs name theirs), else the local devices.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --topology: number of slices.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print every config field with its value as --config.FIELD=VALUE lines, and exit.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host; launch/ scripts set this).")


def _initialize_distributed() -> None:
    """`jax.distributed.initialize()`; JAX_NUM_PROCESSES / JAX_PROCESS_ID fill what jax 0.10 does
    not read from the environment itself (it reads JAX_COORDINATOR_ADDRESS, and cluster env
    such as SLURM, Cloud TPU and GKE)."""
    import os

    import jax

    kwargs = {}
    for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(env):
            try:
                kwargs[arg] = int(os.environ[env])
            except ValueError:
                raise app.UsageError(f"{env}={os.environ[env]!r} must be an integer") from None
    jax.distributed.initialize(**kwargs)


def _config_keys(config, prefix="") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, "items"):
            keys += _config_keys(v, prefix + k + ".")
    return keys


def config_flag_lines(config, prefix="--config.") -> list[str]:
    """`--config.a.b=VALUE` for every leaf field of `config`, in the config's order."""
    lines = []
    for k, v in config.items():
        if hasattr(v, "items"):
            lines += config_flag_lines(v, f"{prefix}{k}.")
        else:
            lines.append(f"{prefix}{k}={_flag_value(v)}")
    return lines


def _flag_value(v) -> str:
    import json

    if isinstance(v, str):
        return json.dumps(v) if v == "" or any(c.isspace() or c in "\"'{}|" for c in v) else v
    if isinstance(v, (list, tuple)):
        return repr(tuple(v)) if isinstance(v, tuple) else json.dumps(v)
    return str(v)


_HELP_FLAGS = {"--help": True, "-help": True, "-h": True, "-?": True, "--helpshort": True,
               "--helpfull": False, "-helpfull": False}


_LIST_OVERRIDES: list[tuple[str, str, list]] = []   # (flag, field path, value) of `--config.x=[...]`
_LIST_OR_STRING = ("data.datasets",)   # a JSONL file list as a string, or the datasets as a list
_LIST_FLAG = re.compile(r"--config\.([\w.]+)=(\s*\[.*)$", re.S)


def _take_list_overrides(argv: list[str]) -> list[str]:
    """Removes `--config.FIELD=[...]` (a JSON list, as --print_config writes list fields) from
    `argv` into _LIST_OVERRIDES: ml_collections' config flags cannot override list fields."""
    import json

    keep = []
    for a in argv:
        m = _LIST_FLAG.match(a)
        if not m:
            keep.append(a)
            continue
        try:
            value = json.loads(m.group(2))
        except json.JSONDecodeError as e:
            print(f"FATAL Flags parsing error: --config.{m.group(1)}: not a JSON list ({e}); write lists as JSON, "
                  'e.g. --config.data.datasets=\'[{"name": "mine", "files": ["pairs.jsonl"]}]\'', file=sys.stderr)
            sys.exit(1)
        _LIST_OVERRIDES.append((f"--config.{m.group(1)}", m.group(1), value))
    return keep


def _apply_list_overrides(config) -> None:
    for flag, path, value in _LIST_OVERRIDES:
        *parents, leaf = path.split(".")
        node = config
        for k in parents:
            node = node.get(k) if hasattr(node, "get") else None
        current = node[leaf] if hasattr(node, "get") and leaf in node else None
        if isinstance(current, (list, tuple)):
            node[leaf] = type(current)(value)
        elif path in _LIST_OR_STRING:
            with node.ignore_type():
                node[leaf] = value
        else:
            print(f"FATAL Flags parsing error: {flag}: the config has no list field {path!r} (--print_config lists "
                  "the fields; a JSON list sets only a list field)", file=sys.stderr)
            sys.exit(1)


def _parse_flags(argv):
    """absl's flag parsing, with a one-line error for an unknown `--config.x` field, and help
    (--help, --helpshort, --helpfull) that exits 0.

    ml_collections raises a bare AttributeError (with a traceback) for a field the locked
    config does not have; absl handles only its own flag errors.
    """
    argv = _take_list_overrides(argv)
    sys.argv[:] = [a for a in sys.argv if not _LIST_FLAG.match(a)]   # ml_collections reads sys.argv too
    asked = [a for a in argv[1:] if a in _HELP_FLAGS]
    if asked:
        app.usage(shorthelp=_HELP_FLAGS[asked[0]], writeto_stdout=True, exitcode=0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.",
              file=sys.stderr)
        sys.exit(1)
    except (AttributeError, KeyError) as e:
        import re

        found = re.search(r"[A-Za-z_]\w*", str(e))   # "'name'" or "'name'\nDid you mean ..."
        field = found.group(0) if found else str(e)
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        flag = next((a for a in overrides if field in a.split(".")), None)
        if flag is None:
            raise
        import difflib

        from embedder.train.config import base_config

        wanted = flag[len("--config."):]
        close = difflib.get_close_matches(wanted, _config_keys(base_config()), n=2, cutoff=0.8)
        hint = f" Did you mean {', '.join('--config.' + c for c in close)}?" if close else ""
        print(f"FATAL Flags parsing error: {flag}: the config has no field {field!r} (configs are locked: "
              f"only existing fields can be overridden; --print_config lists them).{hint}", file=sys.stderr)
        sys.exit(1)


# -- workdir check: the training writes DIR with local file APIs (pathlib, Orbax on a path), so a
# URL would become a relative directory named "gs:" or fail deep inside a multi-host start.
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _reject_url_workdir(workdir: str | None) -> None:
    """Exit 2 with one line when --workdir is a URL (gs://, s3://, ...) instead of a mounted path."""
    if workdir and _URL_SCHEME.match(workdir):
        print(f"error: --workdir {workdir!r} is a URL, but the training writes its workdir with local file "
              "APIs; mount the bucket (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) and pass the "
              "mounted path (e.g. --workdir /mnt/BUCKET/PATH); launch/tpu_vm.sh and launch/gke_jobset.py "
              "do this for you.", file=sys.stderr)
        sys.exit(2)


def _reject_unloadable_config() -> None:
    """Exit 2 with one line when the --config file could not be loaded (ml_collections defers
    that error to the config's first use, deep inside the run)."""
    try:
        _CONFIG.value.keys()
    except OSError as e:
        reason = str(e).strip().splitlines()[-1].strip()   # "[Errno 2] No such file or directory: 'x.py'"
        print(f"error: --config {flags.FLAGS['config'].config_filename}: cannot be loaded ({reason}); pass an "
              "experiment config file, e.g. --config experiments/demo.py:prefinetune", file=sys.stderr)
        sys.exit(2)


def main(argv):
    _reject_url_workdir(_WORKDIR.value)   # before any JAX / distributed work: cheap and certain
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config experiments/demo.py:prefinetune")
    _reject_unloadable_config()
    _apply_list_overrides(_CONFIG.value)
    if _PRINT_CONFIG.value:
        print("\n".join(config_flag_lines(_CONFIG.value)))
        return
    if _COMPILE_ONLY.value:
        from embedder.train.compile_only import compile_only

        sys.exit(compile_only(_CONFIG.value, topology=_TOPOLOGY.value, num_slices=_NUM_SLICES.value))
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if _DISTRIBUTED.value:
        _initialize_distributed()
    from embedder.checkpoint.read_faults import CheckpointReadError
    from embedder.data.records import BadRecordError
    from embedder.train.init_from import InitFromError
    from embedder.train.loop import ConfigError, NonFiniteLossError, train

    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (BadRecordError, CheckpointReadError, ConfigError, InitFromError, NonFiniteLossError) as e:
        # A data, config, storage or divergence problem, not a bug: one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # This process is ours: the CPU tuning, after one restart that gives XLA:CPU's big buffers huge
    # pages (embedder/cpu_tuning.py; the restarted process hands its children the user's environment).
    cpu_tuning.tune_command(restart=True)
    app.run(main, flags_parser=_parse_flags)
