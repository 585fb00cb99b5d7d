"""Data: tokenizers, task prompts, TFDS builders and the grain training pipeline."""

from embedder.data.prompts import Prompts
from embedder.data.tokenizer import (SentencePieceTokenizer, Tokenizer, WordPieceTokenizer, load_tokenizer,
                                     pad_batch, train_sentencepiece)

__all__ = ["Prompts", "SentencePieceTokenizer", "Tokenizer", "WordPieceTokenizer", "load_tokenizer",
           "pad_batch", "train_sentencepiece"]
