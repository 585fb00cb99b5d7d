"""Executes experiments/notebooks/quickstart.ipynb (nbclient) on a randomly initialised tiny model export."""
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    import jax
    import jax.numpy as jnp

    from embedder.checkpoint import save_params
    from embedder.data.prompts import Prompts
    from embedder.model import EmbeddingModel, get_model_config

    config = get_model_config("tiny")
    model = EmbeddingModel(config)
    ids = jnp.ones((1, 8), jnp.int32)
    params = jax.jit(lambda key: model.init(key, ids, ids))(jax.random.PRNGKey(0))["params"]
    params = jax.device_get(jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                                   is_leaf=lambda x: hasattr(x, "value")))
    spec = {"model": config.to_dict(),
            "tokenizer": {"kind": "sentencepiece", "file": "debian_sp8k.model", "max_length": 64},
            "prompts": Prompts().to_dict()}
    out = tmp_path_factory.mktemp("tiny") / "export"
    save_params(out, params, spec, tokenizer_file=REPO / "embedder" / "assets" / "debian_sp8k.model")
    return out


def test_quickstart_notebook_runs(tiny_export, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("EMBEDDER_MODEL", str(tiny_export))
    monkeypatch.setenv("QUICKSTART_DOCS", "40")
    monkeypatch.setenv("QUICKSTART_EVAL_TEXTS", "64")
    # The kernel inherits this process's environment (CPU JAX, 8 fake devices from conftest).
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"model: {tiny_export}" in outputs
    assert "recall@1 at full dim" in outputs and "DebianSectionClustering" in outputs
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
