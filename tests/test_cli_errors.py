"""Mistakes in a command's input end the command with one line that names the problem and the
fix, and a non-zero exit: no traceback. Each case runs the real command in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, write_debian_pairs
from gguf_files import train_bpe_model, write_tiny_gemma_gguf


def _run(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _one_line_error(out, *phrases):
    """The command failed, printed no traceback, and its last stderr line is the whole error."""
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = [line for line in out.stderr.splitlines() if line.strip()][-1]
    for phrase in phrases:
        assert phrase in last, out.stderr[-3000:]
    return last


def test_train_with_a_missing_config_file(tmp_path):
    out = _run("embedder.train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "run"))
    _one_line_error(out, "--config", "nope.py", "No such file or directory", "pass an experiment config file")


def test_convert_to_hf_onto_a_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "taken").write_text("x")
    out = _run("embedder.convert", "to-hf", str(tmp_path / "src"), str(tmp_path / "taken"))
    _one_line_error(out, "DST_DIR", "is a file", "pass the path of a new or empty directory")
    assert (tmp_path / "taken").read_text() == "x"


CONFIG = """
import importlib.util
def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("tiny_config", {tiny!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config({pairs!r})
    c.model = {model!r}
    c.tokenizer.file = ""
    c.init_from = {source!r}
    c.prompts = {{"query": "", "document": ""}}
    c.total_steps = 2
    return c
"""


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    bpe = train_bpe_model(root / "bpe")
    return write_tiny_gemma_gguf(root / "body.gguf", bpe, quantized=False, hidden=64, heads=2, kv_heads=1,
                                 head_dim=32, mlp=128, layers=2, window=8)


def _write_config(tmp_path, source, **model_changes):
    from embedder import model_store

    _, spec = model_store.load_model(source)
    model = dict(spec["model"], projection_dims=(16,), mrl_dims=(16, 8), **model_changes)
    pairs = write_debian_pairs(tmp_path / "pairs.jsonl", 32)
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG.format(tiny=str(REPO / "tests" / "configs" / "tiny.py"), pairs=str(pairs),
                                  model=json.loads(json.dumps(model)), source=str(source)))
    return path


def test_train_from_an_init_from_source_that_does_not_fit(gguf_source, tmp_path):
    config = _write_config(tmp_path, gguf_source, hidden_size=32)
    out = _run("embedder.train", "--config", str(config), "--workdir", str(tmp_path / "run"))
    _one_line_error(out, "error: init_from=", "parameter encoder/embedding has shape", "set config.model")


def test_train_from_an_init_from_source_that_does_not_exist(gguf_source, tmp_path):
    config = _write_config(tmp_path, gguf_source)
    out = _run("embedder.train", "--config", str(config), "--workdir", str(tmp_path / "run"),
               f"--config.init_from={tmp_path / 'gone.gguf'}")
    _one_line_error(out, "error: init_from=", "gone.gguf", "does not exist", "set --config.init_from")
