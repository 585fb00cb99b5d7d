"""LLM client for any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, Ollama) over httpx."""
from __future__ import annotations

from typing import Mapping, Sequence

import httpx

from embedder.synth.llm_client import LLMClient, Message, server_id
from embedder.synth.retry import FatalLLMError, RetryableError, parse_retry_after

_PARAM_NAMES = ("temperature", "top_p", "max_tokens", "seed", "stop")


def chat_completions_url(base_url: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` -> `http://host:8000/v1/chat/completions`."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


class OpenAICompatibleClient(LLMClient):
    backend = "openai"

    def __init__(self, model: str, *, base_url: str, api_key: str | None = None, timeout: float = 120.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url {base_url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
        self.model = model
        self.url = chat_completions_url(base_url)
        self.server = server_id(self.url)
        self._key = api_key
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # One pooled client shared by all worker threads (httpx.Client is thread-safe).
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout))

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text

    def complete(self, messages: Sequence[Message], params: Mapping[str, object]) -> str:
        body = {"model": self.model, "messages": [dict(m) for m in messages]}
        body.update({k: params[k] for k in _PARAM_NAMES if k in params and params[k] is not None})
        try:
            resp = self._http.post(self.url, json=body)
        except httpx.TimeoutException as err:
            raise RetryableError(f"timeout from {self.url}: {type(err).__name__}") from None
        except httpx.TransportError as err:
            raise RetryableError(f"connection error to {self.url}: {self._redact(str(err))}") from None
        status = resp.status_code
        if status == 429 or status >= 500:
            raise RetryableError(f"HTTP {status} from {self.url}", parse_retry_after(resp.headers.get("Retry-After")))
        if status >= 400:
            raise FatalLLMError(
                f"HTTP {status} from {self.url} for model {self.model!r}: {self._redact(resp.text[:300])} "
                "(check --base-url, the model name and the API key variable)"
            )
        try:
            payload = resp.json()
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            # A proxy or an overloaded server can return a truncated page with 200.
            raise RetryableError(f"malformed response body from {self.url}: {resp.text[:120]!r}") from None
        return content if isinstance(content, str) else ""

    def close(self) -> None:
        self._http.close()
