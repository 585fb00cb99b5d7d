"""The pod configs load for both stages and are consistent with their topology (no compile here:
`launch/scale_table.py` / `--compile_only` compile them; see launch/SCALE.md)."""

import importlib.util
import math
import pathlib

import pytest

from embedder.model import ModelConfig
from embedder.train.compile_only import parse_topology

ROOT = pathlib.Path(__file__).resolve().parents[1]
PODS = sorted((ROOT / "experiments").glob("pod_gemma3_*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_three_pod_configs():
    assert [p.stem for p in PODS] == ["pod_gemma3_12b", "pod_gemma3_1b", "pod_gemma3_4b"]


@pytest.mark.parametrize("path", PODS, ids=lambda p: p.stem)
@pytest.mark.parametrize("stage", ["prefinetune", "finetune"])
def test_pod_config_is_consistent(path, stage):
    module = _load(path)
    c = module.get_config(stage)
    topo = parse_topology(c.topology)
    chips = math.prod(topo.dims)
    mesh = list(c.mesh.shape)
    known = math.prod(d for d in mesh if d != -1)
    assert chips % known == 0, (mesh, chips)
    mesh = [chips // known if d == -1 else d for d in mesh]
    data_parallel = mesh[0] * mesh[1]   # the batch splits over data x fsdp
    cfg = ModelConfig.from_dict(c.model.to_dict())
    assert cfg.scan_layers and cfg.remat == "full" and cfg.dtype == "bfloat16"
    assert tuple(c.loss.dims) == cfg.mrl_dims and max(cfg.mrl_dims) == cfg.embedding_dim
    # Every gradient-cache chunk splits evenly over the data-parallel devices.
    assert c.batch_size % c.grad_cache_chunks == 0
    assert (c.batch_size // c.grad_cache_chunks) % data_parallel == 0
    # Tensor parallelism must divide the heads it shards.
    assert cfg.num_heads % mesh[2] == 0 and cfg.num_kv_heads % mesh[2] == 0
    if stage == "prefinetune":
        assert c.batch_size >= 8192 and c.data.num_negatives == 0 and c.tokenizer.max_length == 512
    else:
        assert c.batch_size == 1024 and c.data.num_negatives == 1
    with pytest.raises(ValueError, match=":prefinetune or :finetune"):
        module.get_config("pretrain")
