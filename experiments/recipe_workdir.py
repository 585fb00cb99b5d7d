"""A recipe workdir's settings: one set per workdir (a rerun with others is refused, so no table
mixes runs), and reusing another workdir's convert and stage 1 when only later stages differ."""
from __future__ import annotations

import json
import pathlib


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def settings_diff(old: dict, new: dict) -> str:
    a, b = _flat(old), _flat(new)
    return ", ".join(f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def settings_guard(wd: pathlib.Path, settings: dict) -> None:
    """A workdir keeps one set of settings: a rerun with others is refused, so no table mixes runs."""
    path = wd / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            raise SystemExit(f"{wd} was run with other settings ({settings_diff(old, settings)}; see {path}): "
                             "use a new --workdir (--reuse-stage1 OLD keeps its stage 1), or the same options")
        return
    path.write_text(json.dumps(settings, indent=1))


# Settings that only the stages after stage 1 read: a workdir that differs only in these may reuse
# another's convert, eval-base and stage 1 (and the validation task), which the others decide.
AFTER_STAGE1 = ("stage2", "runs")
REUSED = {"paths": ("base", "validation", "stage1"), "evals": ("untrained", "stage1"),
          "timing": ("convert", "eval_untrained", "stage1", "eval_stage1")}


def reuse_stage1(wd: pathlib.Path, src: pathlib.Path, settings: dict, log) -> None:
    """Links `src`'s converted model, validation task and stage 1 into `wd` (read only; nothing in
    `src` is changed) and copies their evaluations and timing, marked `reused_from`. Refused unless
    `src` ran every setting stage 1 and the stages before it read with the values `wd` uses."""
    path = src / "settings.json"
    if not path.is_file():
        raise SystemExit(f"--reuse-stage1 {src}: no settings.json there (not a recipe workdir)")
    if not (src / "stage1" / "export" / "model.json").is_file():
        raise SystemExit(f"--reuse-stage1 {src}: its stage 1 is not finished ({src / 'stage1' / 'export'} is missing)")
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in AFTER_STAGE1}
    new = {k: v for k, v in settings.items() if k not in AFTER_STAGE1}
    if old != new:
        raise SystemExit(f"--reuse-stage1 {src}: its stage 1 ran with other settings ({settings_diff(old, new)}; see {path})")
    for name in REUSED["paths"]:
        dst = wd / name
        if dst.is_symlink() and dst.resolve() == (src / name).resolve():
            continue
        if dst.exists() or dst.is_symlink():
            raise SystemExit(f"--reuse-stage1 {src}: {dst} already exists; reuse only into a new workdir")
        dst.symlink_to((src / name).resolve(), target_is_directory=True)
    (wd / "eval").mkdir(exist_ok=True)
    for name in REUSED["evals"]:
        if (src / "eval" / f"{name}.json").is_file() and not (wd / "eval" / f"{name}.json").is_file():
            (wd / "eval" / f"{name}.json").write_bytes((src / "eval" / f"{name}.json").read_bytes())
    timing_file = wd / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    src_timing = json.loads((src / "timing.json").read_text()) if (src / "timing.json").is_file() else {}
    for stage in REUSED["timing"]:
        if stage in src_timing and stage not in timing:
            timing[stage] = dict(src_timing[stage], reused_from=str(src))
    timing_file.write_text(json.dumps(timing, indent=1))
    log.info("reusing %s's converted model, validation task and stage 1", src)
