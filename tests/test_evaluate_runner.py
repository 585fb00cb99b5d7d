"""Task loading, the task runner at several MRL dims, result keys, plots and the CLI, on tiny synthetic tasks."""
import gzip
import json
import sys
import types

import numpy as np
import pytest
from test_evaluate_fakes import HashingEncoder, make_tasks

from embedder.evaluate import (TaskFormatError, evaluate_task, evaluate_tasks, flatten_results, infer_task_type,
                               load_task, mean_metrics, truncate_normalize)
from embedder.evaluate.plots import parse_eval_key, plot_metrics_vs_step, plot_score_vs_dim, plot_stages


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    return make_tasks(tmp_path_factory.mktemp("tasks"))


def test_types_are_inferred_from_files_in_jsonl_and_gz(tmp_path):
    dirs = make_tasks(tmp_path, gz=True, with_meta=False)
    for kind, d in dirs.items():
        assert infer_task_type(d) == kind
        task = load_task(d)
        assert task.type == kind and task.name == d.name
    retrieval = load_task(dirs["retrieval"])
    assert retrieval.prompt == "search result"
    # only judged queries are evaluated, as BEIR does
    assert "unjudged" not in retrieval.data["query_ids"] and len(retrieval.data["query_ids"]) == 12
    assert load_task(dirs["sts"]).prompt == "sentence similarity"


def test_task_json_sets_name_type_and_prompt(task_dirs):
    task = load_task(task_dirs["clustering"])
    assert (task.name, task.type, task.prompt) == ("Toyclustering", "clustering", "p-clustering")


def test_bad_task_dirs_give_clear_errors(tmp_path, task_dirs):
    with pytest.raises(TaskFormatError, match="does not exist"):
        load_task(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskFormatError, match="cannot tell the task type"):
        load_task(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    with gzip.open(bad / "test.jsonl.gz", "wt") as f:
        f.write('{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(TaskFormatError, match=r"test.jsonl.gz:2: not valid JSON"):
        load_task(bad)
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "test.jsonl").write_text('{"text": "a"}\n')
    (missing / "task.json").write_text('{"type": "clustering"}')
    with pytest.raises(TaskFormatError, match=r"lacks field\(s\) \['label'\]"):
        load_task(missing)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "task.json").write_text('{"type": "regression"}')
    with pytest.raises(TaskFormatError, match="unknown task type 'regression'"):
        load_task(unknown)
    # a qrels row pointing at a document that is not in the corpus
    import shutil

    r = tmp_path / "r"
    shutil.copytree(task_dirs["retrieval"], r)
    with open(r / "qrels" / "test.tsv", "a") as f:
        f.write("q1\tghost\t1\n")
    with pytest.raises(TaskFormatError, match="'ghost'"):
        load_task(r)


def test_all_task_types_at_two_dims_with_roles_prompts_and_titles(task_dirs):
    enc = HashingEncoder(dim=32)
    results = evaluate_tasks(enc, list(task_dirs.values()), dims=[32, 8], batch_size=4, seeds=2, shots=(2,))
    assert set(results) == {f"Toy{k}" for k in task_dirs}
    expected = {"retrieval": "ndcg_at_10", "classification": "accuracy_2shot", "clustering": "v_measure",
                "sts": "spearman", "pair_classification": "ap", "reranking": "mrr_at_10"}
    for kind, metric in expected.items():
        r = results[f"Toy{kind}"]
        assert r["type"] == kind and set(r["dims"]) == {"32", "8"}
        for dim in ("32", "8"):
            assert np.isfinite(r["dims"][dim][metric])
    # the fake shares words between queries and their documents, so retrieval works
    assert results["Toyretrieval"]["dims"]["32"]["recall_at_100"] == 1.0
    assert results["Toyretrieval"]["dims"]["32"]["ndcg_at_10"] > 0.5
    assert results["Toyclassification"]["dims"]["32"]["accuracy"] > 0.9
    # the encoder was only ever asked for the full dim, in chunks of 4 * batch_size
    assert all(c["dim"] is None and c["n"] <= 16 for c in enc.calls)
    doc_calls = [c for c in enc.calls if c["role"] == "document"]
    assert {c["task"] for c in doc_calls} == {"p-retrieval", "p-reranking"}
    titled = [c for c in doc_calls if c["task"] == "p-retrieval"]
    assert sum(len(c["titles"]) for c in titled) == 40 and titled[0]["titles"][0] == "games"
    assert titled[0]["titles"][1] is None
    query_tasks = {c["task"] for c in enc.calls if c["role"] == "query"}
    assert query_tasks == {f"p-{k}" for k in task_dirs}


def test_mrl_dim_scores_equal_scores_of_truncated_embeddings(task_dirs):
    enc = HashingEncoder(dim=32)
    got = evaluate_task(enc, task_dirs["retrieval"], dims=[8])["dims"]["8"]
    task = load_task(task_dirs["retrieval"])
    d = task.data
    q = truncate_normalize(HashingEncoder(32).encode(d["query_texts"]), 8)
    c = truncate_normalize(HashingEncoder(32).encode(d["corpus_texts"], titles=d["corpus_titles"]), 8)
    # brute force: full score matrix, full sort
    rankings = {qid: [d["corpus_ids"][j] for j in np.argsort(-(q[i] @ c.T), kind="stable")]
                for i, qid in enumerate(d["query_ids"])}
    ref = mean_metrics(rankings, d["qrels"])
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_max_queries_subsamples_deterministically(task_dirs):
    enc = HashingEncoder(dim=16)
    a = evaluate_task(enc, task_dirs["retrieval"], max_queries=5)
    b = evaluate_task(enc, task_dirs["retrieval"], max_queries=5)
    assert a["size"] == {"queries": 5, "corpus": 40} and a == b
    c = evaluate_task(enc, task_dirs["classification"], max_queries=10, shots=(1,), seeds=1)
    assert c["size"] == {"train": 10, "test": 10}


def test_flatten_keys_round_trip_and_duplicate_names_are_refused(task_dirs):
    results = evaluate_tasks(HashingEncoder(16), [task_dirs["sts"], task_dirs["clustering"]], dims=[16, 4], seeds=1)
    flat = flatten_results(results)
    assert flat["eval/Toysts/spearman@4"] == results["Toysts"]["dims"]["4"]["spearman"]
    for key in flat:
        task, metric, dim = parse_eval_key(key)
        assert flat[key] == results[task]["dims"][str(dim)][metric]
    assert parse_eval_key("train/loss") is None
    with pytest.raises(ValueError, match="more than once"):
        evaluate_tasks(HashingEncoder(16), [task_dirs["sts"], task_dirs["sts"]])


def test_plots_are_written(tmp_path, task_dirs):
    results = evaluate_tasks(HashingEncoder(16), [task_dirs["sts"], task_dirs["pair_classification"]],
                             dims=[16, 8, 4])
    png = plot_score_vs_dim(results, tmp_path / "dims.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run, steps in (("a", [0, 10, 20]), ("b", [0, 5])):
        (tmp_path / run).mkdir()
        with open(tmp_path / run / "metrics.jsonl", "w") as f:
            for s in steps:
                f.write(json.dumps({"step": s, "train/loss": 1.0}) + "\n")
                f.write(json.dumps({"step": s, "eval/T/ndcg_at_10@64": s / 100, "eval/T/ndcg_at_10@32": s / 200,
                                    "eval/T/v_measure_std@64": 0.0}) + "\n")
            f.write('{"step": 99, "eval/T/ndc')  # partial line of a killed run
    files = plot_metrics_vs_step(tmp_path / "a" / "metrics.jsonl", tmp_path / "plots")
    assert [p.name for p in files] == ["T__ndcg_at_10.png"]
    files = plot_stages([tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl"], tmp_path / "stages")
    assert files[0].stat().st_size > 1000


def _fake_embedder_module(monkeypatch, loaded):
    module = types.ModuleType("embedder.inference")

    class Embedder:
        @classmethod
        def load(cls, path):
            loaded.append(path)
            encoder = HashingEncoder(16)
            encoder.config = types.SimpleNamespace(matryoshka_dims=(16, 8))   # the model's own dims
            return encoder

    module.Embedder = Embedder
    monkeypatch.setitem(sys.modules, "embedder.inference", module)


def test_cli_help_bad_flags_bad_task_and_a_run(tmp_path, task_dirs, monkeypatch, capsys):
    from embedder.evaluate.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--dims" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--model", "m", "--task", "t", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--bogus" in err
    with pytest.raises(SystemExit):
        main(["--model", "m", "--task", "t", "--dims", "7x"])
    assert "--dims wants" in capsys.readouterr().err
    loaded = []
    _fake_embedder_module(monkeypatch, loaded)
    assert main(["--model", "m", "--task", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1 and loaded == []  # failed before loading the model
    assert main(["--model", "m", "--task", str(task_dirs["sts"]), "--dims", "64"]) == 2
    assert "exceed the model's output dim 16" in capsys.readouterr().err
    out = tmp_path / "res" / "r.json"
    rc = main(["--model", "mymodel", "--task", str(task_dirs["sts"]), "--task", str(task_dirs["reranking"]),
               "--out", str(out), "--batch_size", "8",   # no --dims: the model's own (16, 8)
               "--plot", str(tmp_path / "dims.png")])
    assert rc == 0 and loaded == ["m", "mymodel"]
    printed = capsys.readouterr().out
    assert "Toysts" in printed and "spearman" in printed and "Toyreranking" in printed
    assert (tmp_path / "dims.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(out.read_text())
    assert saved["dims"] == [16, 8] and set(saved["results"]["Toysts"]["dims"]) == {"16", "8"}
