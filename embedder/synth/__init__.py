"""Synthetic training data: LLM clients, query generation, LLM filtering, classification data, hard negatives
(embedding-model or BM25 mining).

Command line: `python -m embedder.synth queries|filter|classify|negatives --help`.
"""
from embedder.synth.cache import MemoryCache, ResponseCache, cache_key
from embedder.synth.clients import make_client, parse_llm_spec
from embedder.synth.llm_client import LLMClient
from embedder.synth.retry import FatalLLMError, RetryableError, RetryPolicy
from embedder.synth.runner import LLMRequest, LLMResult, LLMRunner

__all__ = [
    "FatalLLMError", "LLMClient", "LLMRequest", "LLMResult", "LLMRunner", "MemoryCache", "ResponseCache",
    "RetryPolicy", "RetryableError", "cache_key", "make_client", "parse_llm_spec",
]
