"""`BACKEND:MODEL` -> an `LLMClient` of that backend, its API key from the environment."""
from __future__ import annotations

import os
from typing import Sequence

from embedder.synth.llm_client import LLMClient

BACKENDS = ("openai", "gemini")
OPENAI_KEY_ENVS = ("OPENAI_API_KEY",)
GEMINI_KEY_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def parse_llm_spec(spec: str) -> tuple[str, str]:
    """'openai:qwen2.5-7b' -> ('openai', 'qwen2.5-7b')."""
    backend, sep, model = spec.partition(":")
    if not sep or not model or backend not in BACKENDS:
        raise ValueError(
            f"--llm {spec!r}: expected BACKEND:MODEL with BACKEND one of {', '.join(BACKENDS)}, "
            "e.g. openai:qwen2.5-7b or gemini:gemini-2.5-flash"
        )
    return backend, model


def api_key_from_env(names: Sequence[str], required: bool) -> str | None:
    """First non-empty key among env `names`; raise naming the variables when required."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    if required:
        raise ValueError(f"no API key: set one of {', '.join(names)} in the environment")
    return None


def make_client(
    spec: str,
    *,
    base_url: str | None = None,
    timeout: float = 120.0,
    api_key_env: str | None = None,
) -> LLMClient:
    """Build a client from `BACKEND:MODEL`; keys come only from the environment."""
    backend, model = parse_llm_spec(spec)
    # Backends load on demand: they need the `synth` extra (httpx, google-genai).
    if backend == "openai":
        from embedder.synth.openai_backend import OpenAICompatibleClient

        envs = (api_key_env,) if api_key_env else OPENAI_KEY_ENVS
        key = api_key_from_env(envs, required=False)  # local servers need none
        return OpenAICompatibleClient(model, base_url=base_url or "http://127.0.0.1:8000/v1", api_key=key,
                                      timeout=timeout)
    from embedder.synth.gemini_backend import GeminiClient

    envs = (api_key_env,) if api_key_env else GEMINI_KEY_ENVS
    key = api_key_from_env(envs, required=True)
    return GeminiClient(model, api_key=key, base_url=base_url, timeout=timeout)
