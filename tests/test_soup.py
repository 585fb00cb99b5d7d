"""Tests for embedder.soup: exact uniform/weighted averages, greedy guarantee, error messages, CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder import checkpoint, model_store, soup

SPEC = {"model": {"family": "bert", "hidden": 8}, "tokenizer": {"kind": "wordpiece", "file": "tokenizer.json"},
        "prompts": None}


def params_of(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"layer": {"kernel": (scale * rng.standard_normal((8, 6))).astype(np.float32),
                      "bias": (scale * rng.standard_normal((6,))).astype(np.float32)},
            "embed": rng.standard_normal((16, 8)).astype(jnp.bfloat16)}


def export(tmp_path, name, params, spec=SPEC):
    return checkpoint.save_params(tmp_path / name, params, spec)


def reference(ingredients, weights=None):
    """Plain NumPy: float32 sequential sum in ingredient order; uniform scales by float32(1/N) at the end."""
    out = {}
    keys = checkpoint.flat_paths(ingredients[0])
    for key in keys:
        acc = None
        for i, p in enumerate(ingredients):
            x = np.asarray(checkpoint.flat_paths(p)[key]).astype(np.float32)
            if weights is not None:
                x = np.float32(weights[i]) * x
            acc = x if acc is None else acc + x
        if weights is None:
            acc = acc * np.float32(1.0 / len(ingredients))
        out[key] = acc.astype(np.asarray(keys[key]).dtype)
    return out


def assert_bitwise(tree, ref):
    flat = checkpoint.flat_paths(tree)
    assert sorted(flat) == sorted(ref)
    for k, v in flat.items():
        v = np.asarray(v)
        assert v.dtype == ref[k].dtype, k
        np.testing.assert_array_equal(v.view(np.uint16) if v.dtype == jnp.bfloat16 else v,
                                      ref[k].view(np.uint16) if v.dtype == jnp.bfloat16 else ref[k], err_msg=k)


@pytest.mark.parametrize("shard", [False, True])
def test_uniform_soup_is_exact_mean(tmp_path, shard):
    ingredients = [params_of(s) for s in range(3)]
    paths = [export(tmp_path, f"m{i}", p) for i, p in enumerate(ingredients)]
    params, spec, report = soup.make_soup(paths, method="uniform", shard=shard)
    assert_bitwise(params, reference(ingredients))
    if shard:
        assert len(params["layer"]["kernel"].sharding.device_set) == 8
    assert spec["model"] == SPEC["model"]
    assert [e["weight"] for e in report["ingredients"]] == [pytest.approx(1 / 3)] * 3
    # A soup of two identical ingredients is that ingredient, bit for bit ((x + x) * 0.5 is exact).
    same, _, _ = soup.make_soup([paths[0]] * 2, shard=shard)
    assert_bitwise(same, {k: np.asarray(v) for k, v in checkpoint.flat_paths(ingredients[0]).items()})


def test_weighted_soup_and_workdir_ingredient(tmp_path):
    from tests.test_checkpoint import write_workdir

    states = write_workdir(tmp_path / "run", steps=(4,), async_save=False)
    run_params = jax.tree.map(np.asarray, states[4].params)
    # The workdir's params (tests.test_checkpoint.make_params) have another layout: export a matching tree.
    other = jax.tree.map(lambda x: (np.asarray(x, np.float32) * 0.5 + 1).astype(x.dtype), run_params)
    ex = checkpoint.save_params(tmp_path / "other", other, json.loads((tmp_path / "run" / "config.json")
                                                                      .read_text())["model_spec"])
    params, _, report = soup.make_soup([tmp_path / "run", ex], method="weighted", weights=[1, 3], shard=False)
    assert_bitwise(params, reference([run_params, other], [0.25, 0.75]))
    assert report["ingredients"][0]["step"] == 4 and report["ingredients"][0]["kind"] == "step"
    assert [e["weight"] for e in report["ingredients"]] == [0.25, 0.75]


def distance_score(target):
    def score(params, spec):
        flat = checkpoint.flat_paths(params)
        return -float(sum(np.sum((np.asarray(flat[k], np.float64) - np.asarray(target[k], np.float64)) ** 2)
                          for k in target))
    return score


def test_greedy_keeps_helpful_ingredients_only(tmp_path):
    target = params_of(0)
    delta = params_of(1, scale=0.1)
    plus = jax.tree.map(lambda t, d: (t.astype(np.float32) + d.astype(np.float32)).astype(t.dtype), target, delta)
    minus = jax.tree.map(lambda t, d: (t.astype(np.float32) - d.astype(np.float32)).astype(t.dtype), target, delta)
    far = params_of(7, scale=3.0)
    paths = [export(tmp_path, n, p) for n, p in (("far", far), ("plus", plus), ("minus", minus))]
    target_flat = {k: np.asarray(v) for k, v in checkpoint.flat_paths(target).items()}
    score = distance_score(target_flat)
    params, _, report = soup.make_soup(paths, method="greedy", score_fn=score, shard=False)
    by_name = {e["path"].rsplit("/", 1)[-1]: e for e in report["ingredients"]}
    assert by_name["far"]["weight"] == 0.0
    assert by_name["plus"]["weight"] == by_name["minus"]["weight"] == 0.5
    assert report["soup_score"] == score(params, SPEC)
    assert report["soup_score"] > max(e["score"] for e in report["ingredients"])


@pytest.mark.parametrize("seed", range(4))
def test_greedy_never_below_best_ingredient(tmp_path, seed):
    rng = np.random.default_rng(seed)
    target = {k: np.asarray(v) for k, v in checkpoint.flat_paths(params_of(100 + seed)).items()}
    paths = [export(tmp_path, f"m{i}", params_of(seed * 10 + i, scale=float(rng.uniform(0.2, 2))))
             for i in range(4)]
    score = distance_score(target)
    params, _, report = soup.make_soup(paths, method="greedy", score_fn=score)
    best = max(e["score"] for e in report["ingredients"])
    assert report["soup_score"] >= best
    assert score(params, SPEC) == pytest.approx(report["soup_score"], rel=1e-6)
    assert sum(e["weight"] for e in report["ingredients"]) == pytest.approx(1.0)


def test_errors(tmp_path):
    a = export(tmp_path, "a", params_of(0))
    renamed = params_of(1)
    renamed["layer"]["weight"] = renamed["layer"].pop("kernel")
    b = export(tmp_path, "b", renamed)
    with pytest.raises(soup.SoupError, match=r"'layer/kernel' is missing from .*b"):
        soup.make_soup([a, b])
    wide = params_of(2)
    wide["layer"]["bias"] = np.zeros((7,), np.float32)
    c = export(tmp_path, "c", wide)
    with pytest.raises(soup.SoupError, match=r"shape mismatch at 'layer/bias': \(6,\) in .*a, \(7,\) in .*c"):
        soup.make_soup([a, c])
    half = params_of(3)
    half["layer"]["bias"] = half["layer"]["bias"].astype(np.float16)
    d = export(tmp_path, "d", half)
    with pytest.raises(soup.SoupError, match="dtype mismatch at 'layer/bias': float32 .* float16"):
        soup.make_soup([a, d])
    with pytest.raises(FileNotFoundError, match="missing"):
        soup.make_soup([a, tmp_path / "missing"])
    with pytest.raises(soup.SoupError, match="greedy.*--task"):
        soup.make_soup([a, a], method="greedy")
    with pytest.raises(soup.SoupError, match="3 weights given for 2 ingredients"):
        soup.make_soup([a, a], method="weighted", weights=[1, 2, 3])
    with pytest.raises(soup.SoupError, match=">= 0"):
        soup.make_soup([a, a], method="weighted", weights=[1, -2])
    with pytest.raises(soup.SoupError, match="only applies to --method weighted"):
        soup.make_soup([a, a], weights=[1, 2])
    other_spec = {**SPEC, "model": {"family": "bert", "hidden": 16}}
    e = export(tmp_path, "e", params_of(4), spec=other_spec)
    with pytest.raises(soup.SoupError, match=r"model configs differ .* \['hidden'\]"):
        soup.make_soup([a, e])


def test_run_time_fields_do_not_block_a_soup(tmp_path):
    # A fine-tuned run (MRL dims, dropout, bf16 compute) souped with its base export
    # (WiSE-FT), and a spec written before a field existed: same architecture.
    a = export(tmp_path, "a", params_of(0), spec={**SPEC, "model": {**SPEC["model"], "scan_layers": False}})
    tuned = {**SPEC["model"], "mrl_dims": [8, 4], "dropout_rate": 0.1, "dtype": "bfloat16"}
    b = export(tmp_path, "b", params_of(1), spec={**SPEC, "model": tuned})
    params, spec, _ = soup.make_soup([a, b], method="weighted", weights=[1, 1])
    assert spec["model"] == {**SPEC["model"], "scan_layers": False}
    assert_bitwise(params, reference([params_of(0), params_of(1)], [0.5, 0.5]))


def test_cli_writes_loadable_soup(tmp_path, capsys):
    ingredients = [params_of(s) for s in range(2)]
    paths = [str(export(tmp_path, f"m{i}", p)) for i, p in enumerate(ingredients)]
    out = tmp_path / "soup"
    assert soup.main(["--out", str(out), "--method", "weighted", "--weights", "1,1", *paths]) == 0
    report = json.loads((out / "soup.json").read_text())
    assert report["method"] == "weighted" and len(report["ingredients"]) == 2
    loaded, spec = model_store.load_model(out)
    assert_bitwise(loaded, reference(ingredients, [0.5, 0.5]))
    assert model_store.locate_model(out).kind == "export"
    assert soup.main(["--out", str(out), *paths]) == 2
    assert "already holds a parameter export" in capsys.readouterr().err
    assert soup.main(["--out", str(tmp_path / "g"), "--method", "greedy", *paths]) == 2
    with pytest.raises(SystemExit):
        soup.main(["--out", str(out), "--weights", "1,x", *paths])


def test_hf_folder_ingredients(tmp_path, capsys):
    # WiSE-FT style: HF / sentence-transformers folders soup with exports, workdirs and each other,
    # converted in memory through the same resolution as Embedder.load.
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from embedder.convert.from_hf import convert_from_hf, read_hf_folder
    from tests.test_convert_hf import _bert_folder

    folders = [tmp_path / "hf_a", tmp_path / "hf_b"]
    for seed, folder in enumerate(folders):
        _bert_folder(folder, seed=seed)
    a, b = (read_hf_folder(f).params for f in folders)
    ex = convert_from_hf(folders[0], tmp_path / "export_a")
    a_flat = {k: np.asarray(v) for k, v in checkpoint.flat_paths(a).items()}

    # The export of a folder souped with the folder itself (sharded, the HF folder first so its
    # metadata places the parameters) is the converted folder, bit for bit.
    params, spec, report = soup.make_soup([folders[0], ex], method="weighted", weights=[0.5, 0.5])
    assert_bitwise(params, a_flat)
    assert len(params["encoder"]["word_embedding"].sharding.device_set) == 8
    assert spec["model"]["family"] == "bert" and spec["tokenizer"]["kind"] == "wordpiece"
    assert [(e["kind"], e["path"]) for e in report["ingredients"]] == [("hf", str(folders[0])),
                                                                        ("export", str(ex))]

    # w / (1 - w) of two different folders through the CLI: the numpy weighted average of their
    # converted params; the word embeddings (stored as is) checked against the raw safetensors too.
    w = 0.3
    out = tmp_path / "wise"
    assert soup.main(["--out", str(out), "--method", "weighted", "--weights", f"{w},{1 - w}", "--no-shard",
                      str(ex), str(folders[1])]) == 0
    written = json.loads((out / "soup.json").read_text())
    assert [(e["kind"], e["path"]) for e in written["ingredients"]] == [("export", str(ex)),
                                                                         ("hf", str(folders[1]))]
    weights = [e["weight"] for e in written["ingredients"]]
    assert weights == pytest.approx([w, 1 - w])
    loaded, _ = model_store.load_model(out)
    assert_bitwise(loaded, reference([a, b], weights))
    raw = [load_file(str(f / "model.safetensors"))["embeddings.word_embeddings.weight"] for f in folders]
    np.testing.assert_array_equal(np.asarray(loaded["encoder"]["word_embedding"]),
                                  np.float32(weights[0]) * raw[0] + np.float32(weights[1]) * raw[1])

    # Greedy loads each ingredient more than once: the far folder is left out.
    score = distance_score(a_flat)
    params, _, report = soup.make_soup([folders[1], folders[0], ex], method="greedy", score_fn=score,
                                       shard=False)
    assert {e["path"]: e["weight"] for e in report["ingredients"]} == {
        str(folders[0]): 0.5, str(ex): 0.5, str(folders[1]): 0.0}
    assert_bitwise(params, a_flat)

    # A folder that is neither an embedder model nor an HF folder says what was expected.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not a saved model .* Hugging Face / sentence-transformers folder"):
        soup.make_soup([ex, tmp_path / "other"])
    assert soup.main(["--out", str(tmp_path / "x"), str(ex), str(tmp_path / "other")]) == 2
    assert "Hugging Face" in capsys.readouterr().err


def _unstack_flat(flat, num_layers):
    """Flat scanned params -> flat unrolled ones, by numpy indexing (independent of layer_stack)."""
    out = {}
    for key, value in flat.items():
        if key.startswith("encoder/layers/"):
            for i in range(num_layers):
                out[key.replace("encoder/layers/", f"encoder/layer_{i}/", 1)] = np.asarray(value)[i]
        else:
            out[key] = np.asarray(value)
    return out


def _stack_flat(flat, num_layers):
    """Flat unrolled params -> flat scanned ones, by np.stack (independent of layer_stack)."""
    out = {k: np.asarray(v) for k, v in flat.items() if not k.startswith("encoder/layer_")}
    for key in flat:
        if key.startswith("encoder/layer_0/"):
            rest = key[len("encoder/layer_0/"):]
            out["encoder/layers/" + rest] = np.stack([np.asarray(flat[f"encoder/layer_{i}/{rest}"])
                                                       for i in range(num_layers)])
    return out


def test_scanned_and_unrolled_ingredients_soup_in_the_first_layout(tmp_path):
    # A scan_layers run's export souped with an HF folder (unrolled) of the same architecture:
    # each ingredient is brought to the first one's layer layout, whichever order they come in.
    pytest.importorskip("transformers")
    from embedder.convert.from_hf import convert_from_hf, read_hf_folder
    from tests.test_convert_hf import _bert_folder

    hf_a, hf_b = tmp_path / "hf_a", tmp_path / "hf_b"
    _bert_folder(hf_a, seed=0)
    _bert_folder(hf_b, seed=1)
    scanned = convert_from_hf(hf_b, tmp_path / "scanned_b", scan_layers=True)
    a_unrolled = {k: np.asarray(v) for k, v in checkpoint.flat_paths(read_hf_folder(hf_a).params).items()}
    b_stored, b_spec = model_store.load_model(scanned)
    assert b_spec["model"]["scan_layers"] is True and "layers" in b_stored["encoder"]
    layers = b_spec["model"]["num_layers"]
    b_scanned = {k: np.asarray(v) for k, v in checkpoint.flat_paths(b_stored).items()}
    b_unrolled = _unstack_flat(b_scanned, layers)
    a_scanned = _stack_flat(a_unrolled, layers)
    assert sorted(b_unrolled) == sorted(a_unrolled)
    assert any(not np.array_equal(a_unrolled[k], b_unrolled[k]) for k in a_unrolled)

    # The metadata check (no arrays read) accepts both orders.
    assert len(soup.locate_ingredients([hf_a, scanned])) == len(soup.locate_ingredients([scanned, hf_a])) == 2

    # HF folder first: the soup is unrolled, with the folder's spec (on the host).
    params, spec, _ = soup.make_soup([hf_a, scanned], method="weighted", weights=[1, 3], shard=False)
    assert_bitwise(params, reference([a_unrolled, b_unrolled], [0.25, 0.75]))
    assert spec == model_store.load_spec(model_store.locate_model(hf_a))
    assert spec["model"]["scan_layers"] is False

    # Scanned export first: the soup is scanned, with the export's spec, placed (sharded) as
    # the export's own parameters are.
    params, spec, report = soup.make_soup([scanned, hf_a], method="weighted", weights=[3, 1])
    assert_bitwise(params, reference([b_scanned, a_scanned], [0.75, 0.25]))
    assert spec == b_spec
    assert [e["kind"] for e in report["ingredients"]] == ["export", "hf"]
    placed = soup.auto_shardings(model_store.locate_model(scanned))
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding, s), params, placed)
    assert len(params["encoder"]["layers"]["mlp"]["up"]["w"].sharding.device_set) == 8

    # The soup written in the scanned layout loads back as such (the spec agrees with the tree).
    out = soup.write_soup(tmp_path / "soup", params, spec, report)
    loaded, loaded_spec = model_store.load_model(out)
    assert loaded_spec["model"]["scan_layers"] is True
    assert_bitwise(loaded, reference([b_scanned, a_scanned], [0.75, 0.25]))

    # Greedy: the best ingredient (the folder, tied with its scanned export and given first)
    # is the soup's first, so its unrolled layout and spec are the soup's; the far one is dropped.
    scanned_a = convert_from_hf(hf_a, tmp_path / "scanned_a", scan_layers=True)

    def score(p, _spec):
        flat = {k: np.asarray(v) for k, v in checkpoint.flat_paths(p).items()}
        flat = _unstack_flat(flat, layers) if "encoder/layers/mlp/up/w" in flat else flat
        return -float(sum(np.sum((flat[k].astype(np.float64) - a_unrolled[k]) ** 2) for k in a_unrolled))

    params, spec, report = soup.make_soup([scanned, hf_a, scanned_a], method="greedy", score_fn=score)
    assert {e["path"]: e["weight"] for e in report["ingredients"]} == {
        str(hf_a): 0.5, str(scanned_a): 0.5, str(scanned): 0.0}
    assert report["ingredients"][0]["path"] == str(hf_a) and spec["model"]["scan_layers"] is False
    assert_bitwise(params, a_unrolled)


def test_layouts_do_not_hide_an_architecture_mismatch(tmp_path):
    pytest.importorskip("transformers")
    from embedder.convert.from_hf import convert_from_hf
    from tests.test_convert_hf import _bert_folder

    hf = tmp_path / "hf"
    _bert_folder(hf, seed=0)
    scanned = convert_from_hf(hf, tmp_path / "scanned", scan_layers=True)
    # One layer fewer, scanned: another architecture, not another layout.
    params, spec = model_store.load_model(scanned)
    params["encoder"]["layers"] = jax.tree.map(lambda x: np.asarray(x)[:1], params["encoder"]["layers"])
    spec = {**spec, "model": {**spec["model"], "num_layers": 1}}
    short = checkpoint.save_params(tmp_path / "short", params, spec)
    for order in ([hf, short], [short, hf]):
        with pytest.raises(soup.SoupError, match=r"model configs differ between .* in \['num_layers'\]; "
                                                 "only runs of one architecture"):
            soup.make_soup(order, method="weighted", weights=[1, 1])
    # A tree that does not match its own spec's layer count says so, naming the ingredient.
    bad = checkpoint.save_params(tmp_path / "bad", params, {**spec, "model": {**spec["model"], "num_layers": 2}})
    with pytest.raises(soup.SoupError, match=r"cannot bring .*bad to the unrolled layer layout .*num_layers=2"):
        soup.make_soup([hf, bad])


# ---------------------------------------------------------------- scoring on real (tiny) models

@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory, repo_root):
    """Three randomly initialised tiny Gemma-style exports (debian tokenizer) and toy task folders."""
    from test_evaluate_fakes import make_tasks

    from embedder.data.prompts import Prompts
    from embedder.model import EmbeddingModel, get_model_config

    root = tmp_path_factory.mktemp("tiny")
    config = get_model_config("tiny")
    model = EmbeddingModel(config)
    ids = jnp.ones((1, 8), jnp.int32)
    spec = {"model": config.to_dict(),
            "tokenizer": {"kind": "sentencepiece", "file": "debian_sp8k.model", "max_length": 32},
            "prompts": Prompts().to_dict()}
    paths = []
    for seed in range(3):
        params = jax.jit(lambda key: model.init(key, ids, ids))(jax.random.PRNGKey(seed))["params"]
        params = jax.device_get(jax.tree.map(lambda x: getattr(x, "value", x), params,
                                             is_leaf=lambda x: hasattr(x, "value")))
        paths.append(checkpoint.save_params(root / f"m{seed}", params, spec,
                                            tokenizer_file=repo_root / "embedder" / "assets" / "debian_sp8k.model"))
    return paths, make_tasks(root / "tasks")


def test_greedy_selection_never_sees_report_queries(tiny_exports, tmp_path, monkeypatch, capsys):
    from embedder import inference
    from embedder.evaluate import load_task
    from embedder.evaluate.query_split import split_task

    paths, tasks = tiny_exports
    retrieval = load_task(tasks["retrieval"])
    select = set(split_task(retrieval, "select").data["query_texts"])
    report = set(split_task(retrieval, "report").data["query_texts"])
    seen = []
    encode = inference.Embedder.encode

    def recording(self, texts, role="query", task=None, **kwargs):
        if role == "query":
            seen.extend(texts)
        return encode(self, texts, role=role, task=task, **kwargs)

    monkeypatch.setattr(inference.Embedder, "encode", recording)
    out = tmp_path / "greedy"
    assert soup.main(["--out", str(out), "--method", "greedy", "--task", str(tasks["retrieval"]),
                      "--metric", "ndcg_at_10", "--dim", "16", "--no-shard", *map(str, paths)]) == 0
    # Every ingredient and every trial soup was scored, on the selection half only.
    assert set(seen) == select and not set(seen) & report
    written = json.loads((out / "soup.json").read_text())
    assert written["tasks"] == [str(tasks["retrieval"])] and written["select_tasks"] == []
    assert written["query_split"] == [{"task": "Toyretrieval", "path": str(tasks["retrieval"]), "half": "select",
                                       "split_seed": 0, "queries": len(select), "of": len(select) + len(report)}]
    assert all(e["score"] is not None for e in written["ingredients"])
    assert "--queries report --split-seed 0" in capsys.readouterr().out

    # A whole task of another type selects only through --select-task.
    assert soup.main(["--out", str(tmp_path / "x"), "--method", "greedy", "--task", str(tasks["classification"]),
                      *map(str, paths)]) == 2
    err = capsys.readouterr().err
    assert "classification task: only retrieval queries split" in err and "--select-task DIR" in err
    chosen, record = soup.selection_tasks([tasks["retrieval"]], [tasks["classification"]], seed=3)
    assert [t.name for t in chosen] == ["Toyretrieval", "Toyclassification"]
    assert chosen[1].data == load_task(tasks["classification"]).data
    assert chosen[0].data["query_ids"] == split_task(retrieval, "select", 3).data["query_ids"]
    assert record["query_split"][0]["split_seed"] == 3 and record["select_tasks"] == [str(tasks["classification"])]


def test_scoring_writes_no_export(tiny_exports, monkeypatch):
    # Candidates are scored in memory through Embedder(params, spec): no temporary export.
    import tempfile

    from embedder import inference
    from embedder.checkpoint import exports
    from embedder.evaluate import evaluate_tasks

    paths, tasks = tiny_exports
    expected = evaluate_tasks(inference.Embedder.load(paths[0]), [tasks["retrieval"]], [16])
    expected = expected["Toyretrieval"]["dims"]["16"]["ndcg_at_10"]

    def refuse(*args, **kwargs):
        raise AssertionError("scoring wrote to disk")

    for module, name in ((checkpoint, "save_params"), (exports, "save_params"), (tempfile, "mkdtemp"),
                         (tempfile, "TemporaryDirectory")):
        monkeypatch.setattr(module, name, refuse)
    score = soup.task_scorer([tasks["retrieval"]], metric="ndcg_at_10", dim=16)
    params, spec = model_store.load_model(paths[0])
    assert score(params, spec) == expected
    _, _, report = soup.make_soup(paths, method="greedy", score_fn=score)
    assert report["soup_score"] >= max(e["score"] for e in report["ingredients"])
