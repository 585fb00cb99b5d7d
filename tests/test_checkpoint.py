"""Tests for embedder.checkpoint: train checkpoints, fallback, resharding, exports, path resolution."""
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from embedder import checkpoint as ckpt, model_store


@struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: object


SPEC = {"model": {"family": "bert", "hidden": 8}, "tokenizer": {"kind": "wordpiece", "file": "tokenizer.json",
                                                                 "max_length": 32}, "prompts": None}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"encoder": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
                        "bias": jnp.asarray(rng.standard_normal((4,)), jnp.float32)},
            "embed": jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16)}


def make_state(step=0, seed=0):
    params = make_params(seed)
    opt_state = optax.adamw(1e-3).init(params)
    # Nonzero moments so a restore that silently zero-fills would be caught.
    opt_state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, opt_state)
    return State(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)


def abstract_of(state, sharding_fn=lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0])):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state)


def assert_trees_equal(a, b):
    fa, fb = ckpt.flat_paths(a), ckpt.flat_paths(b)
    assert list(fa) == list(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k


def write_workdir(workdir, steps=(1, 2), *, metrics=None, tokenizer=True, **kw):
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = json.loads(json.dumps(SPEC))
    if tokenizer:
        (workdir / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    config = {"model_spec": spec, "lr": 0.1}
    (workdir / "config.json").write_text(json.dumps(config))
    states = {}
    with ckpt.TrainCheckpointer(workdir, **kw) as c:
        for i, s in enumerate(steps):
            states[s] = make_state(s, seed=s)
            c.save(s, states[s], {"position": s * 10}, config,
                   metrics=None if metrics is None else {"score": metrics[i]})
        c.wait()
    return states


def test_round_trip_bitwise_async(tmp_path):
    states = write_workdir(tmp_path / "w", steps=(1, 2, 3), max_to_keep=5, async_save=True)
    with ckpt.TrainCheckpointer(tmp_path / "w") as c:
        assert c.all_steps() == [1, 2, 3] and c.latest_step() == 3
        state, data, config = c.restore(abstract_state=abstract_of(states[3]))
        assert isinstance(state, State)
        assert_trees_equal(state, states[3])
        assert data == {"position": 30} and config["lr"] == 0.1
        state2, data2, _ = c.restore(2, abstract_of(states[2]))
        assert_trees_equal(state2, states[2]) and data2 == {"position": 20}


def test_save_interval_and_force(tmp_path):
    with ckpt.TrainCheckpointer(tmp_path, save_interval_steps=2, max_to_keep=10, async_save=False) as c:
        started = [c.save(s, make_state(s), {}, {}) for s in (1, 2, 3, 4)]
        assert c.save(5, make_state(5), {}, {}, force=True)
        assert not c.save(5, make_state(5), {}, {}, force=True)  # already on disk
        # Orbax always keeps the first save of a run, then every save_interval_steps.
        assert started == [True, True, False, True]
        assert c.all_steps() == [1, 2, 4, 5]


@pytest.mark.parametrize("mode,scores,best", [("max", [0.1, 0.9, 0.3, 0.2, 0.4, 0.5], 2),
                                              ("min", [0.5, 0.05, 0.3, 0.2, 0.4, 0.1], 2)])
def test_keep_last_n_and_best(tmp_path, mode, scores, best):
    kw = dict(max_to_keep=2, keep_best_metric="score", best_mode=mode, async_save=False)
    write_workdir(tmp_path, steps=(1, 2, 3, 4, 5, 6), metrics=scores, **kw)
    with ckpt.TrainCheckpointer(tmp_path, **kw) as c:
        assert c.all_steps() == [best, 5, 6]
        assert c.best_step() == best
        # A reopened manager reads the stored metrics and still keeps the best.
        c.save(7, make_state(7), {}, {}, metrics={"score": scores[3]})
        c.save(8, make_state(8), {}, {}, metrics={"other": 1.0})  # lacks the metric: only kept as recent
        c.save(9, make_state(9), {}, {}, metrics={"score": scores[3]})
        c.wait()
        assert c.all_steps() == [best, 8, 9]
    loc = model_store.locate_model(tmp_path, best_metric="score", best_mode=mode)
    assert loc.step == best
    assert model_store.locate_model(tmp_path).step == 9


def _truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _corrupt(step_dir, kind):
    if kind == "missing_item_file":
        (step_dir / "data" / "metadata").unlink()
    elif kind == "missing_item":
        import shutil
        shutil.rmtree(step_dir / "config")
    elif kind == "truncated_tree_metadata":
        _truncate(step_dir / "state" / "_METADATA")
    elif kind == "garbled_json":
        (step_dir / "data" / "metadata").write_text("{'position': oops")
    elif kind == "garbled_arrays":
        for f in (step_dir / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"\x00garbage" * 3)
    elif kind == "orbax_tmp_dir":
        import shutil
        shutil.copytree(step_dir, step_dir.parent / f"{int(step_dir.name) + 1}.orbax-checkpoint-tmp-1234")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_item_file", "missing_item", "truncated_tree_metadata",
                                  "garbled_json", "garbled_arrays", "orbax_tmp_dir"])
def test_corrupt_latest_falls_back(tmp_path, kind, caplog):
    states = write_workdir(tmp_path, steps=(1, 2), async_save=False)
    corrupt_dir = tmp_path / "checkpoints" / ("2" if kind != "orbax_tmp_dir" else "2")
    _corrupt(corrupt_dir, kind)
    expect = 1 if kind != "orbax_tmp_dir" else 2
    with caplog.at_level(logging.WARNING), ckpt.TrainCheckpointer(tmp_path, async_save=False) as c:
        state, data, _ = c.restore(abstract_state=abstract_of(states[expect]))
        assert_trees_equal(state, states[expect])
        assert data == {"position": expect * 10}
        assert any(r.levelno >= logging.WARNING for r in caplog.records)
        if kind != "orbax_tmp_dir":
            # Said loudly: which step was moved and why, which step resumed, how much is lost.
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert any("skipping checkpoint step 2" in m and "checkpoints_corrupt" in m for m in errors), errors
            assert any("resumed from step 1, not the newest step 2: 1 step of training lost" in m
                       for m in errors), errors
            assert c.all_steps() == [1]
            assert list((tmp_path / "checkpoints_corrupt").iterdir())
            # Training resumes from step 1 and can write step 2 again.
            assert c.save(2, states[2], {"position": 20}, {}, force=True)
            c.wait()
            assert c.latest_step() == 2
        assert not list((tmp_path / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def test_explicit_corrupt_step_raises_and_mismatch_is_not_corruption(tmp_path):
    states = write_workdir(tmp_path, steps=(1, 2), async_save=False)
    _corrupt(tmp_path / "checkpoints" / "2", "garbled_json")
    with ckpt.TrainCheckpointer(tmp_path, async_save=False) as c:
        with pytest.raises(ValueError, match="step 2 .* unusable"):
            c.restore(2, abstract_of(states[2]))
        wrong = abstract_of(State(step=states[1].step, params={"other": states[1].params["embed"]},
                                  opt_state=()))
        with pytest.raises(ValueError, match="tree structures differ"):
            c.restore(1, wrong)
        assert c.all_steps() == [1, 2]  # nothing was moved for a caller error


def _fail_first_calls(monkeypatch, owner, name, calls):
    """Makes `owner.name` raise a transient OSError on its first `calls` calls; returns the call log."""
    real, log = getattr(owner, name), []

    def flaky(*args, **kwargs):
        log.append(name)
        if len(log) <= calls:
            raise OSError(5, "Input/output error (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    return log


@pytest.mark.parametrize("where", ["metadata", "arrays"])
def test_transient_read_error_is_retried_and_resumes_newest(tmp_path, monkeypatch, caplog, where):
    from embedder.checkpoint import manager

    states = write_workdir(tmp_path, steps=(1, 2), async_save=False)
    with caplog.at_level(logging.WARNING), ckpt.TrainCheckpointer(
            tmp_path, async_save=False, restore_backoff_s=0) as c:
        owner = manager if where == "metadata" else c._manager
        calls = _fail_first_calls(monkeypatch, owner, "tree_metadata" if where == "metadata" else "restore", 1)
        state, data, _ = c.restore(abstract_state=abstract_of(states[2]))
        assert_trees_equal(state, states[2])
        assert data == {"position": 20} and len(calls) == 2
        assert c.all_steps() == [1, 2]
    assert not (tmp_path / "checkpoints_corrupt").exists()
    assert any("reading checkpoint step 2 failed (attempt 1 of 4), retrying" in r.getMessage()
               for r in caplog.records)


def test_persistent_read_error_fails_in_one_line_and_moves_nothing(tmp_path, monkeypatch):
    from embedder.checkpoint.read_faults import CheckpointReadError

    states = write_workdir(tmp_path, steps=(1, 2), async_save=False)
    with ckpt.TrainCheckpointer(tmp_path, async_save=False, restore_attempts=3, restore_backoff_s=0) as c:
        calls = _fail_first_calls(monkeypatch, c._manager, "restore", 100)
        with pytest.raises(CheckpointReadError) as err:
            c.restore(abstract_state=abstract_of(states[2]))
        assert len(calls) == 3
        assert c.all_steps() == [1, 2]
    message = str(err.value)
    assert "\n" not in message
    assert "checkpoint step 2" in message and "after 3 attempts" in message, message
    assert "OSError: [Errno 5] Input/output error (injected)" in message, message
    assert "nothing was moved" in message, message
    assert not (tmp_path / "checkpoints_corrupt").exists()


def _fail_first_calls_with(monkeypatch, owner, name, calls, exc):
    real, log = getattr(owner, name), []

    def flaky(*args, **kwargs):
        log.append(name)
        if len(log) <= calls:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    return log


def test_a_file_missing_once_is_not_corruption(tmp_path, monkeypatch):
    """A FileNotFoundError that a second read after the back-off does not see again (a FUSE / NFS
    hiccup) moves nothing: the newest step resumes."""
    from embedder.checkpoint import manager

    states = write_workdir(tmp_path, steps=(1, 2), async_save=False)
    with ckpt.TrainCheckpointer(tmp_path, async_save=False, restore_backoff_s=0) as c:
        calls = _fail_first_calls_with(monkeypatch, manager, "tree_metadata", 1,
                                       FileNotFoundError(2, "No such file (injected)", "state/_METADATA"))
        state, _, _ = c.restore(abstract_state=abstract_of(states[2]))
        assert_trees_equal(state, states[2])
        assert len(calls) == 2 and c.all_steps() == [1, 2]
    assert not (tmp_path / "checkpoints_corrupt").exists()


def test_a_file_missing_twice_is_corruption_after_a_second_look(tmp_path, monkeypatch, caplog):
    from embedder.checkpoint import manager

    states = write_workdir(tmp_path, steps=(1, 2), async_save=False)
    (tmp_path / "checkpoints" / "2" / "data" / "metadata").unlink()
    calls = _fail_first_calls_with(monkeypatch, manager, "step_problem", 0, None)
    with caplog.at_level(logging.WARNING), ckpt.TrainCheckpointer(
            tmp_path, async_save=False, restore_backoff_s=0) as c:
        state, _, _ = c.restore(abstract_state=abstract_of(states[1]))
        assert_trees_equal(state, states[1])
        assert c.all_steps() == [1]
    assert calls.count("step_problem") == 3   # step 2 twice (then moved aside), step 1 once
    assert any("checkpoint step 2 looks unusable (missing file data/metadata); reading it again" in r.getMessage()
               for r in caplog.records)


def test_a_programming_error_is_raised_at_once_and_moves_nothing(tmp_path, monkeypatch):
    states = write_workdir(tmp_path, steps=(1, 2), async_save=False)
    with ckpt.TrainCheckpointer(tmp_path, async_save=False, restore_backoff_s=0) as c:
        calls = _fail_first_calls_with(monkeypatch, c._manager, "restore", 100, TypeError("a bug (injected)"))
        with pytest.raises(TypeError, match="a bug"):
            c.restore(abstract_state=abstract_of(states[2]))
        assert len(calls) == 1 and c.all_steps() == [1, 2]
    assert not (tmp_path / "checkpoints_corrupt").exists()


@pytest.mark.parametrize("other_host", ["corrupt", "unreadable"])
def test_every_host_takes_the_worst_verdict(tmp_path, monkeypatch, other_host):
    """A step that reads fine here but that another host found corrupt is moved aside here too (the
    hosts fall back together); one another host could not read stops this host as well."""
    from embedder.checkpoint import manager
    from embedder.checkpoint.read_faults import CheckpointReadError, StepCorrupt

    worst = manager._VERDICTS[StepCorrupt if other_host == "corrupt" else CheckpointReadError]
    seen = []
    monkeypatch.setattr(manager, "_agreed_verdict", lambda v: seen.append(v) or (worst if not seen[1:] else v))
    states = write_workdir(tmp_path, steps=(1, 2), async_save=False)
    with ckpt.TrainCheckpointer(tmp_path, async_save=False, restore_backoff_s=0) as c:
        if other_host == "corrupt":
            state, _, _ = c.restore(abstract_state=abstract_of(states[1]))
            assert_trees_equal(state, states[1])
            assert c.all_steps() == [1] and seen == [0, 0]
        else:
            with pytest.raises(CheckpointReadError, match="another host could not read checkpoint step 2"):
                c.restore(abstract_state=abstract_of(states[2]))
            assert c.all_steps() == [1, 2] and not (tmp_path / "checkpoints_corrupt").exists()


def test_restore_onto_other_mesh(tmp_path):
    devices = jax.devices()
    assert len(devices) == 8
    mesh8 = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    mesh24 = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    def over(mesh, axis):
        return lambda x: NamedSharding(mesh, P(axis) if x.ndim and x.shape[0] % mesh.shape[axis] == 0 else P())

    state = make_state(3)
    state = jax.device_put(state, jax.tree.map(over(mesh8, "data"), state))
    assert state.params["embed"].sharding.spec == P("data")
    with ckpt.TrainCheckpointer(tmp_path, async_save=True) as c:
        c.save(3, state, {}, {})
        c.wait()
        for target in (over(mesh24, "model"), lambda x: jax.sharding.SingleDeviceSharding(devices[5])):
            restored, _, _ = c.restore(abstract_state=abstract_of(state, target))
            assert_trees_equal(restored, state)
            leaf = restored.params["embed"]
            assert leaf.sharding == target(leaf)


def test_save_load_params_and_tokenizer(tmp_path):
    tok = tmp_path / "src" / "my_tok.json"
    tok.parent.mkdir()
    tok.write_text("{}")
    params = make_params(1)
    out = ckpt.save_params(tmp_path / "export", params, SPEC, tokenizer_file=tok)
    saved_spec = json.loads((out / "model.json").read_text())
    assert saved_spec["tokenizer"]["file"] == "my_tok.json" and (out / "my_tok.json").is_file()
    loaded, spec = model_store.load_model(out)
    assert_trees_equal(loaded, params)
    assert isinstance(loaded["embed"], np.ndarray) and loaded["embed"].dtype == jnp.bfloat16
    assert spec["tokenizer"]["file"] == str((out / "my_tok.json").resolve())
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    on_mesh, _ = model_store.load_model(out, shardings=NamedSharding(mesh, P()))
    assert on_mesh["embed"].sharding == NamedSharding(mesh, P())
    assert_trees_equal(on_mesh, params)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ckpt.save_params(out, params, SPEC)
    with pytest.raises(ValueError, match="tree structures differ"):
        model_store.load_model(out, shardings={"embed": NamedSharding(mesh, P())})


def test_resolve_and_export_each_kind(tmp_path):
    states = write_workdir(tmp_path / "w", steps=(1, 2), metrics=[0.9, 0.1], keep_best_metric="score",
                           async_save=False)
    workdir = tmp_path / "w"
    params, spec = model_store.load_model(workdir)
    assert_trees_equal(params, states[2].params)
    assert spec["model"] == SPEC["model"]
    assert spec["tokenizer"]["file"] == str((workdir / "tokenizer.json").resolve())
    best, _ = model_store.load_model(workdir, best_metric="score")
    assert_trees_equal(best, states[1].params)
    step_params, _ = model_store.load_model(workdir / "checkpoints" / "1")
    assert_trees_equal(step_params, states[1].params)

    export = model_store.export_params(workdir / "checkpoints" / "1", tmp_path / "export")
    assert (export / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    ex_params, ex_spec = model_store.load_model(export)
    assert_trees_equal(ex_params, states[1].params)
    assert ex_spec["model"] == SPEC["model"]
    assert model_store.locate_model(export).kind == "export"

    soup = ckpt.save_params(tmp_path / "soup", ex_params, ex_spec, extra_files={"soup.json": {"method": "x"}})
    soup_params, _ = model_store.load_model(soup)
    assert_trees_equal(soup_params, states[1].params)
    meta = model_store.param_metadata(workdir)
    assert meta["embed"] == ((16, 8), np.dtype(jnp.bfloat16))


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_store.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a saved model"):
        model_store.load_model(tmp_path / "empty")
    write_workdir(tmp_path / "w", steps=(1,), async_save=False)
    with pytest.raises(ValueError, match="recorded metric 'score'"):
        model_store.load_model(tmp_path / "w", best_metric="score")
    _corrupt(tmp_path / "w" / "checkpoints" / "1", "missing_item")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        model_store.load_model(tmp_path / "w")
    with pytest.raises(ValueError, match="unusable"):
        model_store.load_model(tmp_path / "w" / "checkpoints" / "1")
    (tmp_path / "w2" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError):
        ckpt.TrainCheckpointer(tmp_path / "w2", max_to_keep=0)
