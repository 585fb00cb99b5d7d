"""LLM client for Gemini models through `google-genai` (key from GEMINI_API_KEY / GOOGLE_API_KEY)."""
from __future__ import annotations

from typing import Mapping, Sequence

import httpx

from embedder.synth.llm_client import LLMClient, Message, server_id
from embedder.synth.retry import FatalLLMError, RetryableError, parse_retry_after


class GeminiClient(LLMClient):
    backend = "gemini"

    def __init__(self, model: str, *, api_key: str, base_url: str | None = None, timeout: float = 120.0):
        # google-genai (the optional `synth` extra) loads when a Gemini client is made.
        from google import genai
        from google.genai import types

        self.model = model
        self.server = server_id(base_url) if base_url else "google-genai default endpoint"
        self._key = api_key
        self._types = types
        http_options = types.HttpOptions(
            timeout=int(timeout * 1000),  # milliseconds
            # Our runner retries (with Retry-After and accounting); the SDK must not retry too.
            retry_options=types.HttpRetryOptions(attempts=1),
            **({"base_url": base_url} if base_url else {}),
        )
        self._client = genai.Client(api_key=api_key, http_options=http_options)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text

    def complete(self, messages: Sequence[Message], params: Mapping[str, object]) -> str:
        from google.genai import errors  # see __init__

        types = self._types
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
        contents = [
            types.Content(role="model" if m["role"] == "assistant" else "user", parts=[types.Part(text=m["content"])])
            for m in messages
            if m["role"] != "system"
        ]
        config = types.GenerateContentConfig(
            system_instruction=system,
            temperature=params.get("temperature"),
            top_p=params.get("top_p"),
            max_output_tokens=params.get("max_tokens"),
            seed=params.get("seed"),
        )
        try:
            response = self._client.models.generate_content(model=self.model, contents=contents, config=config)
        except errors.APIError as err:
            code = getattr(err, "code", None) or 0
            retry_after = None
            headers = getattr(getattr(err, "response", None), "headers", None)
            if headers is not None:
                retry_after = parse_retry_after(headers.get("Retry-After"))
            if code == 429 or code >= 500:
                raise RetryableError(f"Gemini HTTP {code} for {self.model!r}", retry_after) from None
            raise FatalLLMError(
                f"Gemini HTTP {code} for model {self.model!r}: {self._redact(str(err))[:300]} "
                "(check the model name and GEMINI_API_KEY / GOOGLE_API_KEY)"
            ) from None
        except httpx.TimeoutException as err:
            raise RetryableError(f"Gemini timeout: {type(err).__name__}") from None
        except httpx.TransportError as err:
            raise RetryableError(f"Gemini connection error: {self._redact(str(err))}") from None
        # Blocked or empty candidates give None; downstream parsing counts it as unparseable.
        return response.text or ""

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()
