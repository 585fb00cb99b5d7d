"""synth LLM pipelines against a scripted local OpenAI-compatible (and Gemini REST) server."""
import collections
import gzip
import http.server
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from embedder.synth import cli
from embedder.synth.cache import MemoryCache
from embedder.synth.clients import make_client
from embedder.synth.negatives import MiningConfig, mine_negatives
from embedder.synth.retry import RetryPolicy
from embedder.synth.runner import LLMRunner

FAST = ["--timeout", "0.5", "--backoff", "0.01", "--max-backoff", "0.05", "--max-retries", "4"]
SECRET = "sk-TEST-0123456789-do-not-leak"


class ScriptedServer:
    """127.0.0.1 HTTP server answering /v1/chat/completions (and Gemini generateContent) from a script.

    `answer(prompt)` gives the assistant text for the last user message; markers in
    the prompt make the first attempts fail: [429] (Retry-After 0.2), [500] (twice),
    [slow] (answers after the client's timeout), [badbody] (non-JSON 200), [hang]
    (blocks until `release` is set).
    """

    def __init__(self, answer):
        self.answer = answer
        self.seen = collections.Counter()  # prompt -> requests received
        self.times = collections.defaultdict(list)
        self.answered = []  # prompts whose full answer was sent
        self.auth = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=()):
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                gemini = ":generateContent" in self.path
                if gemini:
                    prompt = body["contents"][-1]["parts"][0]["text"]
                    server.auth.append(self.headers.get("x-goog-api-key"))
                else:
                    prompt = body["messages"][-1]["content"]
                    server.auth.append(self.headers.get("Authorization"))
                with server.lock:
                    server.seen[prompt] += 1
                    n = server.seen[prompt]
                    server.times[prompt].append(time.monotonic())
                try:
                    if "[hang]" in prompt and not server.release.is_set():
                        server.release.wait(30)
                        return self._send(503, "released")
                    if "[429]" in prompt and n == 1:
                        return self._send(429, "slow down", [("Retry-After", "0.2")])
                    if "[500]" in prompt and n <= 2:
                        return self._send(500, "oops")
                    if "[slow]" in prompt and n == 1:
                        time.sleep(1.0)
                    if "[badbody]" in prompt and n == 1:
                        return self._send(200, "<html>proxy error</html>")
                    if "[401]" in prompt:
                        return self._send(401, "invalid key: " + str(self.headers.get("Authorization")))
                    text = server.answer(prompt)
                    if gemini:
                        payload = {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}]}
                    else:
                        payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                    self._send(200, json.dumps(payload), [("Content-Type", "application/json")])
                    with server.lock:
                        server.answered.append(prompt)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def passage_tag(prompt):
    """The last passage in a prompt (few-shot examples come before it)."""
    return re.findall(r"Passage: (.*)", prompt)[-1]


def scripted_answer(prompt):
    if "[garbage]" in prompt:
        return "Sure! Here you go: ~~~ no json at all"
    if "How likely" in prompt:
        return json.dumps({"likelihood": 5 if "[far]" in passage_tag(prompt) else 90})
    if prompt.startswith("Rate how well"):
        return json.dumps({"rating": 0 if "[bad]" in passage_tag(prompt) else 3})
    if "search-engine query" in prompt:
        return "```json\n" + json.dumps({"query": "find " + passage_tag(prompt).split()[0]}) + "\n```"
    if prompt.startswith("List "):
        round_no = re.search(r"list number (\d+)", prompt).group(1)
        return json.dumps({"items": [f"film {round_no}-{i}" for i in range(10)]})
    if prompt.startswith("Write "):
        entity = re.search(r"about: (.*)\.\n", prompt).group(1)
        label = re.search(r"class: (\w+)", prompt).group(1)
        return json.dumps({"text": f"A {label} review of {entity}."})
    if "Choose exactly one of" in prompt:
        text = prompt.split("Text: ")[1]
        if "film 1-9" in text:
            return json.dumps({"label": "neutral"})  # not one of the labels -> unparseable
        if "film 2-8" in text:  # the checker disagrees with the target label
            return json.dumps({"label": "negative" if "positive review" in text else "positive"})
        return json.dumps({"label": "positive" if "positive review" in text else "negative"})
    return "unexpected prompt"


def write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_queries_retries_timeouts_garbage_and_cache(tmp_path):
    texts = ["alpha plain passage", "bravo [429] rate limited", "charlie [500] flaky server",
             "delta [slow] answer", "echo [garbage] reply", "foxtrot [badbody] proxy", "golf plain", "hotel plain"]
    write_jsonl(tmp_path / "in.jsonl.gz", [{"query": "q", "positive": t, "package": "p" + t[0]} for t in texts], gz=True)
    out = tmp_path / "out.jsonl"
    argv = ["queries", "--llm", "openai:test-model", "--in", str(tmp_path / "in.jsonl.gz"), "--out", str(out),
            "--concurrency", "3", "--cache-dir", str(tmp_path / "cache"), *FAST]
    with ScriptedServer(scripted_answer) as server:
        assert cli.run(argv + ["--base-url", server.url]) == 0
        rows = read_jsonl(out)
        assert [r["query"] for r in rows] == ["find " + t.split()[0] for t in texts if "[garbage]" not in t]
        assert all(r["task"] == "search result" and r["synth"]["llm"] == "openai:test-model" for r in rows)
        assert all(r["synth"]["prompt_id"] == "queries/retrieval/v1" for r in rows)
        assert rows[0]["positive"] == texts[0] and rows[0]["title"] == "pa"

        by_word = {passage_tag(p).split()[0]: n for p, n in server.seen.items()}
        assert by_word == {"alpha": 1, "bravo": 2, "charlie": 3, "delta": 2, "echo": 1, "foxtrot": 2,
                           "golf": 1, "hotel": 1}
        t429 = next(v for p, v in server.times.items() if "[429]" in p)
        assert t429[1] - t429[0] >= 0.19  # Retry-After honoured
        first_total = sum(server.seen.values())

        # A rerun is served from the disk cache: no new requests, same output.
        assert cli.run(argv + ["--base-url", server.url]) == 0
        assert sum(server.seen.values()) == first_total
        assert read_jsonl(out) == rows


def test_retries_exhausted_are_counted_not_fatal():
    class Always500:
        def __call__(self, prompt):
            return "unused"

    with ScriptedServer(Always500()) as server:
        client = make_client("openai:m", base_url=server.url, timeout=0.5)
        runner = LLMRunner(client, MemoryCache(), concurrency=2, retry=RetryPolicy(max_retries=1, base_delay=0.01))
        msgs = [[{"role": "user", "content": f"x [500] {i}"}] for i in range(3)]
        from embedder.synth.runner import LLMRequest

        results = runner.complete_all([LLMRequest(m, {}) for m in msgs])
        assert [r.answer for r in results] == [None, None, None]
        assert runner.stats["failed"] == 3 and runner.stats["retries"] == 3 and runner.stats["requests"] == 6
        assert sum(server.seen.values()) == 6


def _hang_inputs(tmp_path):
    """30 passages; the 13th hangs on the server until released, so a run can be killed there."""
    texts = [f"item{i:02d} plain" for i in range(30)]
    texts[12] = "item12 [hang] plain"
    write_jsonl(tmp_path / "in.jsonl", [{"query": "q", "positive": t} for t in texts])
    return tmp_path / "in.jsonl"


def _sigkill_at_hang(server, args, repo_root):
    """Runs `python -m embedder.synth ARGS` and SIGKILLs it once the hanging prompt was asked;
    returns the prompts answered before the kill and forgets the server's counts."""
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    proc = subprocess.Popen([sys.executable, "-m", "embedder.synth", *args], cwd=repo_root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not any("[hang]" in p for p in server.seen) and time.time() < deadline:
            time.sleep(0.02)
        assert any("[hang]" in p for p in server.seen), proc.stderr.read1().decode() if proc.poll() else "no hang"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    answered = list(server.answered)
    server.seen.clear()
    server.answered.clear()
    server.release.set()   # from now on the hang marker answers normally
    return answered


def test_killed_run_resumes_without_repeating_answered_prompts(tmp_path, repo_root):
    inp, cache = _hang_inputs(tmp_path), tmp_path / "cache"
    with ScriptedServer(scripted_answer) as server:
        answered_before = _sigkill_at_hang(server, [
            "queries", "--llm", "openai:m", "--base-url", server.url, "--in", str(inp),
            "--out", str(tmp_path / "killed.jsonl"), "--concurrency", "1", "--cache-dir", str(cache),
            "--timeout", "20"], repo_root)
        assert len(answered_before) == 12
        assert len(read_jsonl(tmp_path / "killed.jsonl")) == 12  # flushed as they arrived

        # Rerun in-process, with other flags and output but the same cache.
        out = tmp_path / "resumed.jsonl"
        assert cli.run(["queries", "--llm", "openai:m", "--base-url", server.url, "--in", str(inp),
                        "--out", str(out), "--concurrency", "2", "--cache-dir", str(cache), *FAST]) == 0
    assert not set(answered_before) & set(server.seen)  # nothing answered before was asked again
    assert len(server.seen) == 18 and max(server.seen.values()) == 1
    assert [r["query"] for r in read_jsonl(out)] == [f"find item{i:02d}" for i in range(30)]


def test_same_command_after_sigkill_repeats_no_answered_prompt_by_default(tmp_path, repo_root, capsys):
    inp, out = _hang_inputs(tmp_path), tmp_path / "runs" / "q.jsonl"
    with ScriptedServer(scripted_answer) as server:
        command = lambda out, *extra: ["queries", "--llm", "openai:m", "--base-url", server.url,  # noqa: E731
                                       "--in", str(inp), "--out", str(out), "--concurrency", "1", *extra]
        args = command(out, "--timeout", "20")
        answered_before = _sigkill_at_hang(server, args, repo_root)
        assert len(answered_before) == 12
        assert (tmp_path / "runs" / "q.jsonl.llm_cache" / "llm_cache.sqlite").is_file()
        assert cli.run(args) == 0                      # the very same command
        assert not set(answered_before) & set(server.seen)
        assert len(server.seen) == 18 and max(server.seen.values()) == 1
        assert f"answers cached in {out}.llm_cache" in capsys.readouterr().err
        assert [r["query"] for r in read_jsonl(out)] == [f"find item{i:02d}" for i in range(30)]

        server.seen.clear()
        assert cli.run(args) == 0                      # a third run: every answer from the cache
        assert not server.seen
        # --no-cache opts out: nothing on disk, every prompt asked again.
        no_cache = tmp_path / "fresh" / "q.jsonl"
        assert cli.run(command(no_cache, "--no-cache", *FAST)) == 0
        assert len(server.seen) == 30 and not (tmp_path / "fresh" / "q.jsonl.llm_cache").exists()
        assert "answers cached in memory only" in capsys.readouterr().err


def test_cache_dir_and_no_cache_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(["queries", "--llm", "openai:m", "--in", "x.jsonl", "--out", str(tmp_path / "o.jsonl"),
                 "--cache-dir", str(tmp_path / "c"), "--no-cache"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--no-cache: not allowed with argument --cache-dir" in err and len(err.strip().splitlines()) == 1


def test_api_key_never_in_outputs_logs_or_cache(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    write_jsonl(tmp_path / "in.jsonl", [{"query": "q1", "positive": "plain doc one"},
                                        {"query": "q2", "positive": "doc [500] two"}])
    out = tmp_path / "out.jsonl"
    caplog.set_level("DEBUG")
    with ScriptedServer(scripted_answer) as server:
        argv = ["filter", "--llm", "openai:m", "--base-url", server.url, "--in", str(tmp_path / "in.jsonl"),
                "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "-v", *FAST]
        assert cli.run(argv) == 0
        assert set(server.auth) == {f"Bearer {SECRET}"}  # the key is used ...
        # ... and a server that echoes it back in an error is redacted in our message.
        write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "positive": "doc [401]"}])
        assert cli.run(["filter", "--llm", "openai:m", "--base-url", server.url, "--in", str(tmp_path / "bad.jsonl"),
                        "--out", str(tmp_path / "bad_out.jsonl"), *FAST]) == 1
    captured = capsys.readouterr()
    assert "HTTP 401" in captured.err and "<redacted>" in captured.err
    assert len(read_jsonl(out)) == 2
    blobs = [captured.out, captured.err, caplog.text, out.read_text(), repr(make_client("openai:m"))]
    for name in os.listdir(tmp_path / "cache"):
        blobs.append((tmp_path / "cache" / name).read_bytes().decode("utf-8", "replace"))
    for blob in blobs:
        assert SECRET not in blob


def test_gemini_backend_through_google_genai(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    write_jsonl(tmp_path / "in.jsonl", [{"query": "q", "positive": "kilo [429] doc"},
                                        {"query": "q", "positive": "lima [500] doc"}])
    out = tmp_path / "out.jsonl"
    with ScriptedServer(scripted_answer) as server:
        base = server.url[:-len("/v1")]
        assert cli.run(["queries", "--llm", "gemini:gemini-test", "--base-url", base, "--in", str(tmp_path / "in.jsonl"),
                        "--out", str(out), *FAST]) == 0
        assert set(server.auth) == {SECRET}
        assert sorted(server.seen.values()) == [2, 3]
    rows = read_jsonl(out)
    assert [r["query"] for r in rows] == ["find kilo", "find lima"]
    assert rows[0]["synth"]["llm"] == "gemini:gemini-test"
    assert SECRET not in out.read_text() + capsys.readouterr().err


def test_gemini_needs_a_key(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="GEMINI_API_KEY"):
        make_client("gemini:gemini-2.5-flash")


def test_filter_drops_low_ratings_and_false_negatives(tmp_path):
    rows = [
        {"query": "q1", "positive": "good doc", "negatives": ["neg [bad] one", "neg looks relevant", "neg [garbage]"]},
        {"query": "q2", "positive": "[bad] unrelated doc"},
        {"query": "q3", "positive": "[garbage] doc"},
        {"query": "q4", "positive": "another good doc", "task": "t", "synth": {"prompt_id": "queries/retrieval/v1"}},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with ScriptedServer(scripted_answer) as server:
        assert cli.run(["filter", "--llm", "openai:m", "--base-url", server.url, "--in", str(tmp_path / "in.jsonl"),
                        "--out", str(out), "--check-negatives", "--threshold", "2", *FAST]) == 0
    kept = read_jsonl(out)
    assert [r["query"] for r in kept] == ["q1", "q4"]
    assert kept[0]["negatives"] == ["neg [bad] one"] and kept[0]["synth"]["negative_ratings"] == [0.0]
    assert kept[0]["synth"]["rating"] == 3.0 and kept[1]["synth"]["rating"] == 3.0
    assert kept[1]["synth"]["prompt_id"] == "queries/retrieval/v1"  # earlier provenance kept
    assert kept[1]["task"] == "t"


def test_classify_multistage(tmp_path):
    spec = {"name": "films", "entity_kind": "films", "text_kind": "a short review", "task": "film sentiment",
            "labels": ["positive", "negative"], "lists": 3, "entities_per_list": 10, "tail": 3}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out.jsonl"
    with ScriptedServer(scripted_answer) as server:
        assert cli.run(["classify", "--llm", "openai:m", "--base-url", server.url, "--in", str(tmp_path / "spec.json"),
                        "--out", str(out), *FAST]) == 0
    rows = read_jsonl(out)
    entities = {r["synth"]["entity"] for r in rows}
    # Only the tails (items 7-9) of each list; film 1-9 fails the check parse, film 2-8 is relabelled and dropped.
    assert entities == {f"film {k}-{i}" for k in (1, 2, 3) for i in (7, 8, 9)} - {"film 1-9", "film 2-8"}
    assert len(rows) == 2 * len(entities)
    for r in rows:
        assert r["positive"] == r["synth"]["checked_label"] and r["task"] == "film sentiment"
        assert r["query"] == f"A {r['positive']} review of {r['synth']['entity']}."


class WordEncoder:
    """Bag of hashed words, L2-normalised; the Embedder.encode signature."""

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None):
        out = np.zeros((len(texts), 64), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                out[i, sum(map(ord, w)) * 31 % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_negatives_llm_ranking_with_rrf():
    records = [{"query": "red apple pie", "positive": "red apple pie recipe"}]
    extra = [{"text": t} for t in ["red apple pie tart [far] [bad]", "apple pie crust", "red pie dough", "green apple pie",
                                    "unrelated zebra"]]
    with ScriptedServer(scripted_answer) as server:
        runner = LLMRunner(make_client("openai:m", base_url=server.url, timeout=2), MemoryCache(), concurrency=4,
                           retry=RetryPolicy(max_retries=2, base_delay=0.01))
        cfg = MiningConfig(num_negatives=2, top_k=4, rank_window=(1, 4), duplicate_threshold=0.99)
        (row,) = list(mine_negatives(records, WordEncoder(), config=cfg, extra_corpus=extra, runner=runner))
        assert len(server.seen) == 8  # 4 candidates x (relevance, likelihood)
    m = row["synth"]["mining"]
    assert m["method"] == "llm_rrf" and m["llm"] == "openai:m"
    # The [far] candidate is last in both LLM rankings (relevance 0, likelihood 5) though first by
    # embedding: fused last, so it is the hardest negative that the LLM is sure about.
    assert row["negatives"][-1] == "red apple pie tart [far] [bad]" and m["ranks"][-1] == 1
    assert m["likelihood"][-1] == 5.0 and m["relevance"][-1] == 0.0 and len(row["negatives"]) == 2
    assert "red apple pie recipe" not in row["negatives"] and "unrelated zebra" not in row["negatives"]


def test_cache_key_covers_server_backend_model_prompt_and_sampling():
    from embedder.synth.cache import cache_key
    from embedder.synth.llm_client import server_id

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    params = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 1}
    base = dict(backend="openai", model="m", messages=msgs, params=params, server="http://a:8000/v1/chat/completions")
    key = cache_key(**base)
    assert cache_key(**dict(base, params=dict(reversed(params.items())))) == key   # order does not matter
    changes = [dict(server="http://b:8000/v1/chat/completions"), dict(backend="gemini"), dict(model="m2"),
               dict(messages=[msgs[0], {"role": "user", "content": "q2"}]),
               dict(messages=[{"role": "system", "content": "be long"}, msgs[1]])]
    changes += [dict(params=dict(params, **{k: v})) for k, v in
                (("temperature", 0.0), ("top_p", 1.0), ("max_tokens", 65), ("seed", 2))]
    keys = {cache_key(**dict(base, **c)) for c in changes}
    assert key not in keys and len(keys) == len(changes)
    # The server is named without credentials, query or trailing slash.
    assert server_id("https://user:sk-secret@host.example:8443/v1/?key=sk-secret") == "https://host.example:8443/v1"


def test_the_same_model_name_on_another_server_is_asked_again():
    from embedder.synth.runner import LLMRequest

    cache = MemoryCache()
    requests = [LLMRequest([{"role": "user", "content": "name a fruit"}], {"temperature": 0.0})]
    with ScriptedServer(lambda prompt: "apple") as one, ScriptedServer(lambda prompt: "pear") as two:
        first = LLMRunner(make_client("openai:m", base_url=one.url, timeout=2), cache).complete_all(requests)
        again = LLMRunner(make_client("openai:m", base_url=one.url, timeout=2), cache).complete_all(requests)
        other = LLMRunner(make_client("openai:m", base_url=two.url, timeout=2), cache).complete_all(requests)
        assert sum(one.seen.values()) == 1 and sum(two.seen.values()) == 1
    assert [r.answer for r in first + again + other] == ["apple", "apple", "pear"]
    assert again[0].cached and not other[0].cached
