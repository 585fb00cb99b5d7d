"""`init_from` a pretrained body without a head: fresh projection layers from the run's seed, the
source's tokenizer, one-line errors for sources that do not fit, and no re-init on resume.
Also the Gemma-family HF folder that ships only tokenizer.json."""
import json
import logging

import jax
import numpy as np
import pytest

from conftest import load_script, write_debian_pairs
from gguf_files import train_bpe_model, write_tiny_gemma_gguf

pytest.importorskip("gguf")

from embedder import model_store  # noqa: E402
from embedder.checkpoint import flat_paths  # noqa: E402
from embedder.convert.from_gguf import convert_from_gguf  # noqa: E402
from embedder.data.tokenizer import load_tokenizer  # noqa: E402
from embedder.inference import Embedder  # noqa: E402
from embedder.train import loop  # noqa: E402
from embedder.train.init_from import InitFromError, merge_params  # noqa: E402

SMALL = dict(hidden=64, heads=2, kv_heads=1, head_dim=32, mlp=128, layers=2, window=8)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    return train_bpe_model(tmp_path_factory.mktemp("bpe") / "bpe")


@pytest.fixture(scope="module")
def headless_export(tmp_path_factory, bpe_model):
    """A tiny pretrained-style body (GGUF -> from-gguf export): no projection head."""
    root = tmp_path_factory.mktemp("body")
    gguf_file = write_tiny_gemma_gguf(root / "body.gguf", bpe_model, quantized=False, **SMALL)
    return convert_from_gguf(gguf_file, root / "export")


def _tiny_config(pairs_file, repo_root, source, source_spec, **changes):
    """tests/configs/tiny.py on `source_spec`'s architecture with a 16-wide projection, from `source`."""
    c = load_script(repo_root / "tests" / "configs" / "tiny.py").get_config(str(pairs_file))
    c.model = dict(source_spec["model"], projection_dims=(16,), mrl_dims=(16, 8))
    c.loss.dims = (16, 8)
    c.tokenizer.file = ""   # the source model's own tokenizer
    c.init_from = str(source)
    c.prompts = {"query": "", "document": ""}  # the tiny vocabulary spends many tokens on prompts
    c.total_steps = 2
    c.checkpoint.every_steps = 2
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in changes.items()})
    return c


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_debian_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 64)


def test_merge_keeps_source_values_and_fresh_heads_and_names_the_first_misfit():
    fresh = {"encoder": {"embedding": np.zeros((4, 2), np.float32), "norm": np.zeros(2, np.float32)},
             "head": {"projection_0": {"w": np.full((2, 3), 7.0, np.float32)}}}
    fresh = jax.device_put(fresh)
    source = {"encoder": {"embedding": np.arange(8.0).reshape(4, 2), "norm": np.ones(2)},
              "head": {"old": {"w": np.ones((2, 2))}}}
    merged, report = merge_params(source, fresh, source_name="SRC")
    np.testing.assert_array_equal(merged["encoder"]["embedding"], np.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(merged["head"]["projection_0"]["w"], np.full((2, 3), 7.0))
    assert merged["encoder"]["embedding"].dtype == np.float32
    assert report.fresh == ("head/projection_0/w",) and report.unused == ("head/old/w",)

    shapes = {"encoder": {"embedding": np.zeros((5, 2)), "norm": np.ones(2)}}
    with pytest.raises(InitFromError, match=r"^init_from=SRC: parameter encoder/embedding has shape \(5, 2\) "
                                            r"there but \(4, 2\) in config.model - set config.model"):
        merge_params(shapes, fresh, source_name="SRC")
    with pytest.raises(InitFromError, match=r"lacks parameter encoder/norm of config.model \(1 such\); only "
                                            "projection-head parameters can start fresh"):
        merge_params({"encoder": {"embedding": np.zeros((4, 2))}}, fresh, source_name="SRC")
    with pytest.raises(InitFromError, match="has parameter encoder/extra that config.model lacks"):
        merge_params(dict(source, encoder=dict(source["encoder"], extra=np.ones(1))), fresh, source_name="SRC")


def test_run_from_a_headless_body_adds_a_fresh_projection_and_resumes_without_reinit(
        headless_export, pairs_file, repo_root, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="embedder.train")
    source_params, source_spec = model_store.load_model(headless_export)
    config = _tiny_config(pairs_file, repo_root, headless_export, source_spec)
    workdir = tmp_path / "run"
    result = loop.train(config, workdir)
    assert result["step"] == 2
    assert "1 parameter(s) newly initialised from the run's seed: head/projection_0/w" in caplog.text
    # The workdir carries the source's tokenizer, named by basename.
    spec = json.loads((workdir / "config.json").read_text())["model_spec"]
    assert spec["tokenizer"]["file"] == "tokenizer.model" and (workdir / "tokenizer.model").is_file()
    assert load_tokenizer(spec["tokenizer"], workdir).vocab_size == source_spec["model"]["vocab_size"]
    trained, _ = model_store.load_model(workdir)
    assert flat_paths(trained)["head/projection_0/w"].shape == (SMALL["hidden"], 16)
    assert Embedder.load(workdir).encode(["resize a partition"], role="query").shape == (1, 16)
    assert (workdir / "export" / "tokenizer.model").is_file()
    assert Embedder.load(workdir / "export").encode(["resize a partition"], role="query").shape == (1, 16)
    assert not np.array_equal(flat_paths(trained)["encoder/final_norm/scale"],
                              flat_paths(source_params)["encoder/final_norm/scale"])

    caplog.clear()
    config.total_steps = 3
    config.checkpoint.every_steps = 1
    assert loop.train(config, workdir)["step"] == 3
    assert "resumed from step 2" in caplog.text and "initialised parameters from" not in caplog.text


def test_a_resume_needs_only_its_workdir_after_the_init_from_gguf_is_deleted(
        bpe_model, pairs_file, repo_root, tmp_path, monkeypatch):
    """Train 2 steps from a GGUF file, delete the file, resume to 3 steps: the resumed run reads
    its tokenizer from the workdir and never opens (or parses) the source."""
    from embedder.convert import from_gguf

    source = write_tiny_gemma_gguf(tmp_path / "source.gguf", bpe_model, quantized=False, **SMALL)
    _, source_spec = model_store.load_model(source)
    config = _tiny_config(pairs_file, repo_root, source, source_spec)
    workdir = tmp_path / "run"
    assert loop.train(config, workdir)["step"] == 2
    source.unlink()
    parsed = []
    for module in (from_gguf, model_store):
        monkeypatch.setattr(module, "read_gguf", lambda *a, **k: parsed.append(a) or 1 / 0)
    config.total_steps = 3
    config.checkpoint.every_steps = 1
    assert loop.train(config, workdir)["step"] == 3
    assert not parsed


def test_step_zero_params_equal_the_source_and_the_seed(headless_export, pairs_file, repo_root, tmp_path):
    source_params, source_spec = model_store.load_model(headless_export)
    config = _tiny_config(pairs_file, repo_root, headless_export, source_spec)
    heads = []
    for seed in (1, 1, 2):
        config.seed = seed
        trainer = loop.Trainer(config, tmp_path / f"t{len(heads)}")
        trainer.restore_or_init()
        got = flat_paths(jax.device_get(trainer.state.params))
        for path, value in flat_paths(source_params).items():
            np.testing.assert_array_equal(got[path], value, err_msg=path)
        heads.append(got["head/projection_0/w"])
    np.testing.assert_array_equal(heads[0], heads[1])
    assert not np.array_equal(heads[0], heads[2]) and np.std(heads[0]) > 0


def test_mismatched_source_is_a_one_line_error(headless_export, pairs_file, repo_root, tmp_path):
    _, source_spec = model_store.load_model(headless_export)
    config = _tiny_config(pairs_file, repo_root, headless_export, source_spec, model__hidden_size=32)
    trainer = loop.Trainer(config, tmp_path / "bad")
    with pytest.raises(InitFromError) as e:
        trainer.restore_or_init()
    message = str(e.value)
    assert "\n" not in message and "parameter encoder/embedding has shape (320, 64) there but (320, 32)" in message


def _tokenizer_json_only_folder(folder, bpe_model):
    """A tiny transformers Gemma 3 folder that ships tokenizer.json but no tokenizer.model."""
    import torch
    import transformers

    from embedder.convert.hf_tokenizer import sentencepiece_to_tokenizers

    cfg = transformers.Gemma3TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                        sliding_window=8, use_bidirectional_attention=True)
    torch.manual_seed(0)
    transformers.Gemma3TextModel(cfg).save_pretrained(folder)
    tok, _ = sentencepiece_to_tokenizers(bpe_model, add_bos=True, add_eos=False)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    return folder


def test_gemma_folder_with_only_tokenizer_json_imports_and_starts_a_run(
        bpe_model, pairs_file, repo_root, tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    folder = _tokenizer_json_only_folder(tmp_path / "hf", bpe_model)
    assert not (folder / "tokenizer.model").exists()
    params, spec = model_store.load_model(folder)
    assert spec["tokenizer"]["kind"] == "tokenizer_json"
    ours = load_tokenizer(spec["tokenizer"])
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    texts = ["a", "the quick brown fox", "two  spaces\tand\nlines 123", "<bos> literal specials <eos>"]
    assert [ours.encode([t])[0] for t in texts] == [theirs(t)["input_ids"] for t in texts]

    caplog.set_level(logging.INFO, logger="embedder.train")
    config = _tiny_config(pairs_file, repo_root, folder, spec)
    assert loop.train(config, tmp_path / "run")["step"] == 2
    assert "newly initialised from the run's seed: head/projection_0/w" in caplog.text
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_spec"]["tokenizer"]["file"] == \
        "tokenizer.json"


@pytest.mark.parametrize("name", ["pod_gemma3_1b", "pod_gemma3_4b", "pod_gemma3_12b"])
def test_pod_configs_start_from_a_converted_headless_gemma3(name, repo_root):
    """The pod configs' documented start: `from-hf` of the Gemma 3 checkpoint (unrolled layers, no
    head) as init_from for a scanned model with a 3072 -> 768 projection. Checked on shapes only."""
    import flax.linen as nn

    from embedder.convert.hf_config import config_from_hf, config_to_hf
    from embedder.model import EmbeddingModel
    from embedder.model.config import ModelConfig
    from embedder.model.layer_stack import match_layer_layout
    from embedder.train.init_from import check_source

    module = load_script(repo_root / "experiments" / f"{name}.py")
    cfg = ModelConfig.from_dict(module.get_config("prefinetune").model.to_dict())
    source_cfg = config_from_hf(config_to_hf(cfg))   # what from-hf makes of the HF checkpoint's config.json
    assert not source_cfg.scan_layers and source_cfg.projection_dims == ()

    def shapes(c):
        ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
        return nn.meta.unbox(jax.eval_shape(lambda: EmbeddingModel(c).init(jax.random.key(0), ids, ids)["params"]))

    report = check_source(match_layer_layout(shapes(source_cfg), cfg), shapes(cfg), source_name=name)
    assert report.fresh == ("head/projection_0/w", "head/projection_1/w") and report.unused == ()
