"""The MTEB adapter against the installed mteb: protocol conformance, prompts/roles, and score agreement
of mteb's own evaluators with ours on local task folders (no download)."""
import numpy as np
import pytest
from test_evaluate_fakes import HashingEncoder, make_tasks

mteb = pytest.importorskip("mteb")

from mteb.models import EncoderProtocol  # noqa: E402

from embedder.evaluate import evaluate_task  # noqa: E402
from embedder.evaluate.mteb_adapter import MTEBEncoder, local_task, task_prompt  # noqa: E402


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    return make_tasks(tmp_path_factory.mktemp("mteb_tasks"))


def test_adapter_conforms_and_maps_task_types_to_prompts():
    model = MTEBEncoder(encoder=HashingEncoder(16), dim=8)
    assert isinstance(model, EncoderProtocol)
    assert model.mteb_model_meta.similarity_fn_name.value == "cosine"
    sts = mteb.get_task("STSBenchmark").metadata  # metadata only: nothing is downloaded
    assert task_prompt(sts) == "sentence similarity"
    assert task_prompt(mteb.get_task("Banking77Classification").metadata) == "classification"
    assert task_prompt(mteb.get_task("SciFact").metadata) == "search result"
    assert task_prompt(mteb.get_task("AppsRetrieval").metadata) == "code retrieval"
    assert task_prompt(sts, {"STSBenchmark": "custom"}) == "custom"
    with pytest.raises(ValueError, match="model path"):
        MTEBEncoder()


def test_mteb_evaluate_runs_our_encoder_on_a_local_sts_task(task_dirs):
    enc = HashingEncoder(32)
    result = mteb.evaluate(MTEBEncoder(encoder=enc), tasks=[local_task(task_dirs["sts"])], cache=None,
                           show_progress_bar=False, co2_tracker=False)
    ours = evaluate_task(HashingEncoder(32), task_dirs["sts"])["dims"]["32"]
    assert result.task_results[0].get_score() == pytest.approx(ours["spearman"], abs=1e-6)
    assert {c["task"] for c in enc.calls} == {"sentence similarity"}
    assert {c["role"] for c in enc.calls} == {"query"}


def test_mteb_retrieval_and_pair_classification_agree_with_ours(task_dirs):
    enc = HashingEncoder(32)
    model = MTEBEncoder(encoder=enc, dim=16)
    scores = local_task(task_dirs["retrieval"]).evaluate(model, split="test", encode_kwargs={"batch_size": 8})
    ours = evaluate_task(HashingEncoder(32), task_dirs["retrieval"], dims=[16])["dims"]["16"]
    got = scores["default"]
    # mteb rounds its retrieval scores to 5 decimals
    for ours_key, mteb_key in [("ndcg_at_10", "ndcg_at_10"), ("recall_at_10", "recall_at_10"),
                               ("recall_at_1", "recall_at_1"), ("mrr_at_10", "mrr_at_10")]:
        assert got[mteb_key] == pytest.approx(ours[ours_key], abs=1e-5), mteb_key
    docs = [c for c in enc.calls if c["role"] == "document"]
    queries = [c for c in enc.calls if c["role"] == "query"]
    assert docs and queries and {c["task"] for c in enc.calls} == {"search result"}
    assert all(c["dim"] == 16 for c in enc.calls)
    # titles reach the encoder apart from the text (our document prompt formats them)
    titles = [t for c in docs for t in c["titles"]]
    assert "games" in titles and None in titles

    model = MTEBEncoder(encoder=HashingEncoder(32))
    pc = local_task(task_dirs["pair_classification"]).evaluate(model, split="test", encode_kwargs={"batch_size": 8})
    ours = evaluate_task(HashingEncoder(32), task_dirs["pair_classification"])["dims"]["32"]
    assert pc["default"]["cosine_ap"] == pytest.approx(ours["ap"], abs=1e-6)
    assert pc["default"]["cosine_accuracy"] == pytest.approx(ours["accuracy"], abs=1e-6)


def test_local_classification_task_runs(task_dirs):
    model = MTEBEncoder(encoder=HashingEncoder(32))
    cls = local_task(task_dirs["classification"]).evaluate(model, split="test", encode_kwargs={"batch_size": 16})
    assert np.isfinite(cls["default"]["accuracy"]) and cls["default"]["accuracy"] > 0.5
    with pytest.raises(ValueError, match="not wrapped"):
        local_task(task_dirs["reranking"])
