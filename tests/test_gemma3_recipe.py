"""experiments/gemma3_270m.py's stage plumbing on a tiny random Gemma 3 GGUF (`--quick`): convert,
untrained eval, stage 1 with a fresh head, mining by the stage-1 model, three stage-2 runs, soups
selected on the selection half of the queries, the to-hf export checked in sentence-transformers."""
import importlib.util
import json

import pytest

from gguf_files import train_bpe_model, write_tiny_gemma_gguf

pytest.importorskip("gguf")
pytest.importorskip("sentence_transformers")


def _driver(repo_root):
    spec = importlib.util.spec_from_file_location("gemma3_270m", repo_root / "experiments" / "gemma3_270m.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_quick_run_goes_through_every_stage(tmp_path, repo_root):
    driver = _driver(repo_root)
    gguf_file = write_tiny_gemma_gguf(tmp_path / "tiny.gguf", train_bpe_model(tmp_path / "bpe"), quantized=False,
                                      hidden=64, heads=2, kv_heads=1, head_dim=32, mlp=128, layers=2, window=8)
    wd = tmp_path / "run"
    assert driver.main(["--workdir", str(wd), "--gguf", str(gguf_file), "--quick"]) == 0
    results = json.loads((wd / "results.json").read_text())
    names = list(results["rows"])
    assert names == ["untrained (converted LLM)", "1: pre-finetuned", "2: a_seed0", "2: b_seed1_lr5e-5",
                     "2: c_seed2_sections", "uniform soup", "greedy soup"]
    for name, row in results["rows"].items():
        assert {"retrieval/all", "retrieval/select", "retrieval/report", "DebianSectionClassification",
                "DebianSectionClustering"} <= set(row), name
        select, report = row["retrieval/select"]["size"]["queries"], row["retrieval/report"]["size"]["queries"]
        assert select + report == row["retrieval/all"]["size"]["queries"] == 40
    assert results["rows"]["untrained (converted LLM)"]["_dims"] == {"768": 64, "128": 64}
    # Stage 1 started from the converted body with a fresh projection; stage 2 from stage 1.
    stage1 = json.loads((wd / "stage1" / "config.json").read_text())
    assert stage1["init_from"] == str(wd / "base") and stage1["model"]["projection_dims"] == [768]
    assert stage1["data"]["packing"] and stage1["optimizer"]["frozen"] == ["^encoder/embedding$"]
    assert json.loads((wd / "stage2_a_seed0" / "config.json").read_text())["init_from"] == str(wd / "stage1" / "export")
    mined = [json.loads(line) for line in (wd / "mined.jsonl").read_text().splitlines()]
    assert mined and all(len(r["negatives"]) == 1 for r in mined)
    soup = json.loads((wd / "soup_greedy" / "soup.json").read_text())
    assert soup["selection"]["half"] == "select" and len(soup["ingredients"]) == 3
    assert results["export"]["max_abs_diff_vs_sentence_transformers"] <= 1e-5
    assert (wd / "results.md").is_file() and (wd / "results.png").is_file()
    for stage in ("convert", "stage1", "mine", "stage2_a_seed0", "soup_greedy"):
        assert results["timing"][stage]["wall_s"] >= 0 and results["timing"][stage]["peak_rss_gb"] > 0
