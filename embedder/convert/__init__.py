"""Hugging Face <-> embedder checkpoint conversion."""
