"""`Embedder`: load any saved model and encode texts into L2-normalised embeddings.

    m = Embedder.load(PATH)   # workdir, step dir, param export, soup, or HF / s-t folder
    E = m.encode(texts, role="query", task="search result", dim=256)
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from embedder import xla_cpu_flags
from embedder.data.prompts import Prompts
from embedder.data.tokenizer import length_buckets, load_tokenizer, pad_batch
from embedder.model import EmbeddingModel, ModelConfig
from embedder.model.layer_stack import match_layer_layout
from embedder.model.quant import split_int8_kernels
from embedder.model_store import load_model
from embedder.mrl import truncate_normalize

ROLES = ("query", "document")


def row_buckets(n: int, batch_size: int, multiple: int) -> int:
    """Rows to pad a chunk of `n` to: the next power of two (capped at the batch size), then up to
    a multiple of the device count, so a ragged last chunk compiles to one of few shapes."""
    rows = min(1 << max(n - 1, 0).bit_length(), max(batch_size, n))
    return -(-rows // multiple) * multiple


def _jitted_apply(config: ModelConfig, platform: str):
    """One jitted forward per architecture and platform, shared by every Embedder of it: the
    evaluations a training run makes every N steps (a new Embedder each time) reuse the compiled
    buckets. Its XLA options are those `embedder.tune_cpu()` asks for at the time of the call."""
    options = xla_cpu_flags.compiler_options(config.dtype, platform)
    return _jitted_apply_with(config, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=16)
def _jitted_apply_with(config: ModelConfig, options: tuple):
    model = EmbeddingModel(config)
    return jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask), compiler_options=dict(options))


@functools.lru_cache(maxsize=16)
def _jitted_int8_apply(config: ModelConfig, platform: str):
    """The forward with int8 kernels (`Embedder(quantized_compute="int8")`): its variables are
    `quant.split_int8_kernels`' and its dots s8 x s8 -> s32, which XLA:CPU gives YNNPACK (the
    options of a narrow compute dtype)."""
    model = EmbeddingModel(config)
    options = xla_cpu_flags.compiler_options("int8", platform)
    return jax.jit(lambda v, ids, mask: model.apply(v, ids, mask), compiler_options=options)


def precast_params(model: EmbeddingModel, params, dtype):
    """`params` with every leaf that the forward only ever converts to a low-precision compute
    `dtype` (bf16 / f16) converted once here; other leaves (norm scales, f32 heads) unchanged.

    The forward's outputs are the same bits (it converts the converted leaf to itself), without
    re-converting every weight on every call. Leaves are found in the traced forward: each use of
    the leaf must be a `convert_element_type` to `dtype`.
    """
    dtype = np.dtype(jax.numpy.dtype(dtype))
    if dtype.itemsize >= 4:
        return params
    leaves, treedef = jax.tree.flatten(params)
    example = np.zeros((1, 8), np.int32)
    jaxpr = jax.make_jaxpr(lambda p, i, m: model.apply({"params": p}, i, m))(params, example, example).jaxpr
    uses: dict = {id(v): [] for v in jaxpr.invars[:len(leaves)]}   # Vars by identity (Literals never match)
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if id(v) in uses:
                uses[id(v)].append(eqn.primitive.name == "convert_element_type"
                                   and np.dtype(eqn.params["new_dtype"]) == dtype)
    for v in jaxpr.outvars:
        if id(v) in uses:
            uses[id(v)].append(False)
    cast = [bool(u) and all(u) for u in uses.values()]
    return jax.tree.unflatten(treedef, [leaf.astype(dtype) if c else leaf for leaf, c in zip(leaves, cast)])


class Embedder:
    """A model, its tokenizer and prompts; `encode` runs on all local devices."""

    def __init__(self, params, spec: dict, *, tokenizer=None, base_dir=None,
                 config_overrides: dict | None = None, quantized_compute: str = ""):
        """`config_overrides` change how the model runs, not what it is, e.g.
        `{"dtype": "bfloat16", "attention_impl": "dot_product_attention"}`.

        `quantized_compute="int8"` runs every projection in integers (`einsum.int8_einsum`: int8
        weights, one scale per output channel, quantised at load; activations quantised per token;
        s8 x s8 -> s32 dots); attention scores, norms and the embedding lookup stay float32."""
        if not isinstance(spec, dict) or "model" not in spec:
            raise ValueError("spec must be a model-spec dict with 'model', 'tokenizer' and 'prompts'")
        if quantized_compute not in ("", "int8"):
            raise ValueError(f"quantized_compute={quantized_compute!r}; use '' (float) or 'int8'")
        self.quantized_compute = quantized_compute
        self.spec = spec
        overrides = dict(config_overrides or {})
        if quantized_compute:  # integer kernels replace the weights: no fake quantisation, unrolled layers
            overrides.update(dtype="float32", scan_layers=False, quant_scheme="")
        self.config = ModelConfig.from_dict(dict(spec["model"], **overrides))
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec["tokenizer"], base_dir)
        self.prompts = Prompts.from_spec(spec.get("prompts"))
        self.model = EmbeddingModel(self.config)
        self.max_length = int(spec["tokenizer"].get("max_length", self.tokenizer.max_length))
        # Four buckets per octave: padding is wasted compute on CPU/GPU; each bucket compiles once.
        self.buckets = length_buckets(self.max_length, per_octave=4)
        devices = np.array(jax.local_devices())
        self.mesh = Mesh(devices, ("data",))
        self._rows = NamedSharding(self.mesh, P("data"))
        # A scan_layers override runs an unrolled export scanned (or back): restack to match.
        params = match_layer_layout(params, self.config)
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self._apply = _jitted_apply(self.config, devices.flat[0].platform)
        self._run_params = None   # `precast_params` of params, made on the first encode
        if quantized_compute:
            fake = spec["model"].get("quant_scheme")
            if fake:  # a QAT model: its integer kernels start from the weights it was trained to run
                from embedder.model.quant import fake_quantize_params
                params = jax.tree.map(np.asarray, fake_quantize_params(params, fake, spec["model"].get("quant_block", 32)))
            self._run_params = jax.device_put(split_int8_kernels(jax.tree.map(np.asarray, params)),
                                              NamedSharding(self.mesh, P()))
            self._apply = _jitted_int8_apply(self.config, devices.flat[0].platform)

    @classmethod
    def load(cls, path, **kwargs) -> "Embedder":
        """Loads a workdir, checkpoint step dir, param export or soup; a Hugging Face /
        sentence-transformers folder or a GGUF file is converted in memory."""
        params, spec = load_params_and_spec(path)
        return cls(params, spec, **kwargs)

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    def _prefixes(self, n: int, role: str, task, titles) -> list[str]:
        if role not in ROLES:
            raise ValueError(f"role={role!r}; use 'query' or 'document'")
        if role == "query":
            if titles is not None:
                raise ValueError("titles apply to role='document' only")
            return [self.prompts.query_prefix(task)] * n
        if titles is None:
            return [self.prompts.document_prefix(None)] * n
        titles = list(titles)
        if len(titles) != n:
            raise ValueError(f"{len(titles)} titles for {n} texts; give one per text (None for none)")
        return [self.prompts.document_prefix(t) for t in titles]

    def encode(self, texts: Sequence[str], role: str = "query", task: str | None = None,
               dim: int | None = None, batch_size: int = 64,
               titles: Sequence[str | None] | None = None,
               max_length: int | None = None) -> np.ndarray:
        """`(N, dim)` float32 rows, L2-normalised after truncation to the first `dim` coordinates
        (default: the largest of the model's Matryoshka dims, `model.mrl_dims`, else the full width).

        `max_length` truncates texts to fewer tokens than the model's own limit."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings; wrap a single text: encode([text])")
        texts = list(texts)
        full = self.embedding_dim
        dim = max(self.config.matryoshka_dims) if dim is None else int(dim)
        if not 0 < dim <= full:
            raise ValueError(f"dim={dim} must be in 1..{full} (the model's embedding size)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        limit = self.max_length if max_length is None else int(max_length)
        if not 0 < limit <= self.max_length:
            raise ValueError(f"max_length={max_length} must be in 1..{self.max_length} (the model's limit)")
        if not texts:
            return np.zeros((0, dim), np.float32)
        prefixes = self._prefixes(len(texts), role, task, titles)
        seqs = self.tokenizer.encode(texts, max_length=limit, prefixes=prefixes)
        buckets = [b for b in self.buckets if b < limit] + [limit]
        # Longest first, so each chunk pads to a tight bucket; outputs go back to input order.
        order = np.argsort([-len(s) for s in seqs], kind="stable")
        # Every chunk is dispatched before any result is read back: no host sync inside the
        # loop, so the device computes chunk k while the host pads chunk k + 1.
        pending = []
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            pending.append((idx, self._embed([seqs[i] for i in idx], buckets, limit, batch_size)))
        out = np.zeros((len(texts), full), np.float32)
        for idx, emb in pending:
            out[idx] = np.asarray(emb, np.float32)[:len(idx)]
        return truncate_normalize(out, dim)

    def _embed(self, seqs: list[list[int]], buckets, limit: int, batch_size: int) -> jax.Array:
        ids, mask = pad_batch(seqs, self.tokenizer.pad_id, buckets=buckets, max_length=limit)
        n = len(seqs)
        # Empty rows fill a short last chunk to a power of two and a multiple of the device
        # count, so it always shards and reuses one of few compiled shapes.
        rows = row_buckets(n, batch_size, self.mesh.size)
        if rows != n:
            ids = np.concatenate([ids, np.full((rows - n, ids.shape[1]), self.tokenizer.pad_id, ids.dtype)])
            mask = np.concatenate([mask, np.zeros((rows - n, mask.shape[1]), mask.dtype)])
        if self._run_params is None:
            self._run_params = precast_params(self.model, self.params, self.config.dtype)
        return self._apply(self._run_params, jax.device_put(ids, self._rows), jax.device_put(mask, self._rows))


def load_params_and_spec(path) -> tuple:
    """`(params, spec)` of anything `Embedder.load` opens: a workdir, checkpoint step, param
    export or soup, a Hugging Face / sentence-transformers folder or a GGUF file (converted in
    memory). The same store as soups' ingredients and `init_from` (`embedder.model_store`)."""
    return load_model(path)
