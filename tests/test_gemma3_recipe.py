"""experiments/gemma3_270m.py's stage plumbing on a tiny random Gemma 3 GGUF (`--quick`): convert and
the validation task, untrained eval, stage 1 with a fresh head and its learning curve, mining by the
stage-1 model, three stage-2 runs, soups selected on the validation task, the export checked in
sentence-transformers; single stages, missing inputs and changed settings."""
import json

import pytest

from conftest import load_script
from gguf_files import train_bpe_model, write_tiny_gemma_gguf

pytest.importorskip("gguf")
pytest.importorskip("sentence_transformers")


def _driver(repo_root):
    return load_script(repo_root / "experiments" / "gemma3_270m.py")


def test_title_passage_rows_split_first_sentences(repo_root):
    driver = _driver(repo_root)
    titles, spans = driver.title_passage_rows([
        {"query": "a tool", "positive": "Resizes partitions without data loss. It supports ext4 and btrfs on any local disk."},
        {"query": "one sentence", "positive": "Only one sentence here, nothing else to split off"}])
    assert titles == [{"query": "a tool", "positive": "Resizes partitions without data loss. It supports ext4 and "
                                                     "btrfs on any local disk."},
                      {"query": "one sentence", "positive": "Only one sentence here, nothing else to split off"}]
    assert spans == [{"query": "Resizes partitions without data loss.",
                      "positive": "It supports ext4 and btrfs on any local disk."}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    return write_tiny_gemma_gguf(tmp / "tiny.gguf", train_bpe_model(tmp / "bpe"), quantized=False,
                                 hidden=64, heads=2, kv_heads=1, head_dim=32, mlp=128, layers=2, window=8)


def test_stages_alone_need_their_inputs_and_a_workdir_keeps_its_settings(tmp_path, repo_root, tiny_gguf):
    driver = _driver(repo_root)
    wd = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"base.* run --stages convert first"):
        driver.main(["--workdir", str(wd), "--gguf", str(tiny_gguf), "--quick", "--stages", "stage1"])
    assert driver.main(["--workdir", str(wd), "--gguf", str(tiny_gguf), "--quick", "--stages", "convert"]) == 0
    with pytest.raises(SystemExit, match=r"stage1.*export: run --stages stage1 first"):
        driver.main(["--workdir", str(wd), "--gguf", str(tiny_gguf), "--quick", "--stages", "mine"])
    with pytest.raises(SystemExit, match=r"other settings \(stage1.steps: 2 -> 3;"):
        driver.main(["--workdir", str(wd), "--gguf", str(tiny_gguf), "--quick", "--stage1-steps", "3",
                     "--stages", "convert"])
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(SystemExit, match="not a GGUF file"):
        driver.main(["--workdir", str(tmp_path / "other"), "--gguf", str(not_gguf), "--quick"])
    with pytest.raises(SystemExit, match="no such file"):
        driver.main(["--workdir", str(tmp_path / "other"), "--gguf", str(tmp_path / "gone.gguf"), "--quick"])
    assert not (tmp_path / "other").exists()   # refused before anything was written
    # The validation task: its packages (by family) are in no training row.
    stats = json.loads((wd / "validation" / "holdout.json").read_text())
    assert stats["queries"] == 16 and stats["corpus"] == 48


def test_quick_run_goes_through_every_stage(tmp_path, repo_root, tiny_gguf):
    driver = _driver(repo_root)
    wd = tmp_path / "run"
    assert driver.main(["--workdir", str(wd), "--gguf", str(tiny_gguf), "--quick"]) == 0
    results = json.loads((wd / "results.json").read_text())
    names = list(results["rows"])
    assert names == ["untrained (converted LLM)", "1: pre-finetuned", "2: a_seed0", "2: b_seed1_lr1e-5",
                     "2: c_seed2_lr5e-5", "uniform soup", "greedy soup"]
    for name, row in results["rows"].items():
        assert {"validation", "retrieval"} <= set(row), name
        assert row["retrieval"]["size"]["queries"] == 40 and row["validation"]["size"]["queries"] == 16
    # Section tasks: the untrained model, the soups and the exported model only.
    exported = results["export"]["model"]
    for name, row in results["rows"].items():
        full = name in ("untrained (converted LLM)", "uniform soup", "greedy soup", exported)
        assert ("DebianSectionClustering" in row) == full, name
    assert results["rows"]["untrained (converted LLM)"]["_dims"] == {"768": 64, "128": 64}
    # The export is the best candidate on the validation task.
    scores = results["export"]["validation_scores"]
    assert exported == max(scores, key=scores.get)
    # Stage 1 started from the converted body with a fresh projection; stage 2 from stage 1.
    stage1 = json.loads((wd / "stage1" / "config.json").read_text())
    assert stage1["init_from"] == str(wd / "base") and stage1["model"]["projection_dims"] == [768]
    assert stage1["data"]["packing"] and stage1["optimizer"]["frozen"] == ["^encoder/embedding$"]
    assert stage1["eval"]["tasks"] == [str(wd / "validation")]
    assert json.loads((wd / "stage2_a_seed0" / "config.json").read_text())["init_from"] == str(wd / "stage1" / "export")
    # Learning curve: the untrained point and one per stage-1 step (eval_every=1 in --quick).
    assert [p[0] for p in results["learning_curve"]] == [0, 16, 32]
    mined = [json.loads(line) for line in (wd / "mined.jsonl").read_text().splitlines()]
    assert mined and all(len(r["negatives"]) == 1 and r["synth"]["mining"]["retriever"] == "bm25" for r in mined)
    assert not (wd / "section_rows.jsonl").exists()   # no run mixes in section rows
    soup = json.loads((wd / "soup_greedy" / "soup.json").read_text())
    assert soup["selection"]["task"] == str(wd / "validation") and len(soup["ingredients"]) == 4   # + stage 1
    assert results["export"]["max_abs_diff_vs_sentence_transformers"] <= 1e-5
    # Plain BM25 on the validation and test tasks: the reference row that calibrates the two.
    bm25 = results["references"]["BM25, no stemming"]
    assert 0 < bm25["validation nDCG@10 @768"] <= 1 and 0 < bm25["nDCG@10 @768"] <= 1
    assert "| BM25, no stemming (reference) |" in (wd / "results.md").read_text()
    for f in ("results.md", "results.png", "learning_curve.png"):
        assert (wd / f).is_file(), f
    for stage in ("convert", "stage1", "mine", "stage2_a_seed0", "soup_greedy"):
        assert results["timing"][stage]["wall_s"] >= 0 and results["timing"][stage]["peak_rss_gb"] > 0
    # No training row comes from a validation package or shares a text with one.
    held = {json.loads(line)["text"] for line in (wd / "validation" / "queries.jsonl").read_text().splitlines()}
    docs = {json.loads(line)["text"] for line in (wd / "validation" / "corpus.jsonl").read_text().splitlines()}
    for f in ("stage1_titles.jsonl", "mined.jsonl"):
        for line in (wd / f).read_text().splitlines():
            r = json.loads(line)
            assert r["query"] not in held and r["positive"] not in docs
    # A probe: stage 1 again with one lever changed, scored on the validation task only.
    probe = load_script(repo_root / "experiments" / "gemma3_270m_probe.py")
    assert probe.main(["--recipe", str(wd), "--name", "lr1e-3", "--set", '{"lr": 1e-3, "steps": 1, "warmup": 0}']) == 0
    done = json.loads((wd / "probes" / "lr1e-3" / "probe.json").read_text())
    assert done["settings"]["stage1"]["lr"] == 1e-3 and [s for s, _ in done["curve"]] == [1]
    with pytest.raises(SystemExit, match="unknown key"):
        probe.main(["--recipe", str(wd), "--name", "x", "--set", '{"learning_rate": 1}'])
    # A stage-2 probe from the stage-1 export, its negatives mined by the stage-1 model, half its
    # batches multilingual pairs, distilled from a teacher (here the stage-1 model itself).
    assert probe.main(["--recipe", str(wd), "--stage", "2", "--name", "model", "--set", json.dumps(
        {"miner": "model", "rank_window": [1, 5], "mine_corpus": "rows", "steps": 1, "multilingual_share": 0.5,
         "teacher": str(wd / "stage1" / "export"), "distill_weights": [1.0, 0.5]})]) == 0
    config = json.loads((wd / "probes" / "model" / "run" / "config.json").read_text())
    assert [(d["name"], d["weight"]) for d in config["data"]["datasets"]] == [("retrieval", 0.5), ("multilingual", 0.5)]
    assert config["data"]["teacher"] == str(wd / "probes" / "model" / "signals")
    # The multilingual pairs are not distilled, and the teacher pass never read them.
    assert [d.get("distill", True) for d in config["data"]["datasets"]] == [True, False]
    from embedder.distill.signals import read_manifest
    assert "multilingual" not in json.dumps(read_manifest(wd / "probes" / "model" / "signals")["data"])
    assert (config["loss"]["distill_embedding_weight"], config["loss"]["distill_score_weight"]) == (1.0, 0.5)
    metrics = [json.loads(line) for line in (wd / "probes" / "model" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/distill_embedding" in m for m in metrics)
    held = {json.loads(line)["group"] for line in (wd / "validation" / "corpus.jsonl").read_text().splitlines()}
    ml = [json.loads(line) for line in (wd / "probes" / "model" / "multilingual.jsonl").read_text().splitlines()]
    assert len(ml) > 20000 and held and not (wd / "multilingual.jsonl").exists()   # the recipe dir is only read
    assert not {r["positive"] for r in ml} & docs
    with pytest.raises(SystemExit, match="must be in"):
        probe.main(["--recipe", str(wd), "--stage", "2", "--name", "x2", "--set",
                    '{"section_share": 0.5, "multilingual_share": 0.5}'])
    done = json.loads((wd / "probes" / "model" / "probe.json").read_text())
    assert done["stage"] == 2 and [s for s, _ in done["curve"]] == [1]
    mined = [json.loads(line) for line in (wd / "probes" / "model" / "mined.jsonl").read_text().splitlines()]
    assert mined and all(r["synth"]["mining"]["retriever"] == "model" and r["negatives"] for r in mined)
    assert all(1 <= rank <= 5 for r in mined for rank in r["synth"]["mining"]["ranks"])
    # A new workdir that changes only stage 2 reuses this one's stage 1 (linked, never written) ...
    again = tmp_path / "stage2_only"
    assert driver.main(["--workdir", str(again), "--gguf", str(tiny_gguf), "--quick", "--stage2-steps", "2",
                        "--teacher", str(wd / "stage1" / "export"), "--reuse-stage1", str(wd),
                        "--stages", "convert,stage1,mine"]) == 0
    assert (again / "stage1").resolve() == (wd / "stage1").resolve() and (again / "mined.jsonl").is_file()
    timing = json.loads((again / "timing.json").read_text())
    assert timing["stage1"]["reused_from"] == str(wd) and "reused_from" not in timing["mine"]
    assert json.loads((again / "settings.json").read_text())["stage2"] == dict(
        json.loads((wd / "settings.json").read_text())["stage2"], steps=2, teacher=str(wd / "stage1" / "export"))
    # ... but not one whose stage 1 would differ.
    with pytest.raises(SystemExit, match=r"its stage 1 ran with other settings \(stage1.steps: 2 -> 3"):
        driver.main(["--workdir", str(tmp_path / "bad"), "--gguf", str(tiny_gguf), "--quick", "--stage1-steps", "3",
                     "--reuse-stage1", str(wd)])


def test_a_training_stage_stopped_by_a_signal_ends_in_one_line(repo_root, tmp_path, monkeypatch):
    """The loop saves and returns on SIGTERM without an export: the driver says so and how to go on."""
    import logging

    import ml_collections

    import embedder.train.loop as loop

    def stopped(config, out):   # what the loop leaves after SIGTERM: metrics, a checkpoint, no export
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 7, "train/examples_per_sec": 2.0}) + "\n")

    monkeypatch.setattr(loop, "train", stopped)
    run = _driver(repo_root).Recipe(tmp_path, {"dtype": "float32"}, None, logging.getLogger("t"))
    config = ml_collections.ConfigDict(dict(data=dict(data_dir=""), total_steps=120, batch_size=4, grad_cache_chunks=0))
    with pytest.raises(SystemExit, match=r"stage stage2_x stopped at step 7 of 120 .* rerun the same command"):
        run.train("stage2_x", config)
