"""Encoder families (gemma, bert), pooling and projection heads, and named configs."""

from embedder.model.config import MODEL_NAMES, ModelConfig, get_model_config
from embedder.model.embedding_model import EmbeddingModel
from embedder.model.heads import mean_pool

__all__ = ["EmbeddingModel", "ModelConfig", "MODEL_NAMES", "get_model_config", "mean_pool"]
