"""Encoder families (gemma, bert), pooling and projection heads, and named configs."""

from embedder import cpu_random as _cpu_random

# Dropout masks in one fused loop on CPU (embedder/cpu_random.py; EMBEDDER_XLA_CPU_DEFAULTS=0 opts out).
_cpu_random.apply()

from embedder.model.config import MODEL_NAMES, ModelConfig, get_model_config
from embedder.model.embedding_model import EmbeddingModel
from embedder.model.heads import mean_pool

__all__ = ["EmbeddingModel", "ModelConfig", "MODEL_NAMES", "get_model_config", "mean_pool"]
