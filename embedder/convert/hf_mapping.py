"""Pure name and layout mapping between Hugging Face checkpoints and embedder params.

Both directions: `from-hf` uses `to_ours`, `to-hf` uses `to_hf`. No file I/O here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

from embedder.model.config import ModelConfig
from embedder.model.layer_stack import layer_name, unstack_layers


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one HF tensor's layout maps to ours: `to_ours(x)` and its inverse `to_hf(y)`."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


COPY = Layout("copy", lambda x: x, lambda y: y)
# torch Linear stores [out, in]; our Einsum kernels are [in, out].
LINEAR = Layout("linear", lambda x: x.T, lambda y: y.T)


def heads_in(heads: int, head_dim: int) -> Layout:
    """q/k/v projection: HF [heads*head_dim, embed] <-> ours [embed, heads, head_dim]."""
    return Layout(
        f"heads_in({heads},{head_dim})",
        lambda x: x.T.reshape(x.shape[1], heads, head_dim),
        lambda y: y.reshape(y.shape[0], heads * head_dim).T)


def heads_out(heads: int, head_dim: int) -> Layout:
    """Output projection: HF [embed, heads*head_dim] <-> ours [heads, head_dim, embed]."""
    return Layout(
        f"heads_out({heads},{head_dim})",
        lambda x: x.T.reshape(heads, head_dim, x.shape[0]),
        lambda y: y.reshape(heads * head_dim, y.shape[-1]).T)


def heads_bias(heads: int, head_dim: int) -> Layout:
    return Layout(f"heads_bias({heads},{head_dim})",
                  lambda x: x.reshape(heads, head_dim), lambda y: y.reshape(heads * head_dim))


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """HF tensor `hf_name` (without the checkpoint's prefix) <-> params leaf at `path`."""

    hf_name: str
    path: tuple[str, ...]
    layout: Layout = COPY


def _gemma_rules(cfg: ModelConfig) -> Iterator[TensorRule]:
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    enc = ("encoder",)
    yield TensorRule("embed_tokens.weight", enc + ("embedding",))
    yield TensorRule("norm.weight", enc + ("final_norm", "scale"))
    # Gemma 1 names its pre-FFW norm "post_attention_layernorm"; Gemma 2/3 use that name
    # for the real post-attention norm and add "pre_feedforward_layernorm".
    gemma1_naming = not (cfg.use_post_attn_norm or cfg.use_post_ffw_norm)
    for i in range(cfg.num_layers):
        hf, ours = f"layers.{i}.", enc + (layer_name(i),)
        att = ours + ("attention",)
        yield TensorRule(hf + "input_layernorm.weight", ours + ("pre_attention_norm", "scale"))
        if gemma1_naming:
            yield TensorRule(hf + "post_attention_layernorm.weight", ours + ("pre_ffw_norm", "scale"))
        else:
            yield TensorRule(hf + "pre_feedforward_layernorm.weight", ours + ("pre_ffw_norm", "scale"))
            if cfg.use_post_attn_norm:
                yield TensorRule(hf + "post_attention_layernorm.weight",
                                 ours + ("post_attention_norm", "scale"))
            if cfg.use_post_ffw_norm:
                yield TensorRule(hf + "post_feedforward_layernorm.weight",
                                 ours + ("post_ffw_norm", "scale"))
        yield TensorRule(hf + "self_attn.q_proj.weight", att + ("q", "w"), heads_in(n, h))
        yield TensorRule(hf + "self_attn.k_proj.weight", att + ("k", "w"), heads_in(k, h))
        yield TensorRule(hf + "self_attn.v_proj.weight", att + ("v", "w"), heads_in(k, h))
        yield TensorRule(hf + "self_attn.o_proj.weight", att + ("o", "w"), heads_out(n, h))
        if cfg.use_qk_norm:
            yield TensorRule(hf + "self_attn.q_norm.weight", att + ("q_norm", "scale"))
            yield TensorRule(hf + "self_attn.k_norm.weight", att + ("k_norm", "scale"))
        for proj in ("gate", "up", "down"):
            yield TensorRule(hf + f"mlp.{proj}_proj.weight", ours + ("mlp", proj, "w"), LINEAR)


def _bert_rules(cfg: ModelConfig) -> Iterator[TensorRule]:
    n, h = cfg.num_heads, cfg.head_dim
    enc = ("encoder",)
    yield TensorRule("embeddings.word_embeddings.weight", enc + ("word_embedding",))
    yield TensorRule("embeddings.position_embeddings.weight", enc + ("position_embedding",))
    yield TensorRule("embeddings.token_type_embeddings.weight", enc + ("type_embedding",))
    yield TensorRule("embeddings.LayerNorm.weight", enc + ("embed_norm", "scale"))
    yield TensorRule("embeddings.LayerNorm.bias", enc + ("embed_norm", "bias"))
    for i in range(cfg.num_layers):
        hf, ours = f"encoder.layer.{i}.", enc + (layer_name(i),)
        att = ours + ("attention",)
        for hf_qkv, our_qkv in (("query", "q"), ("key", "k"), ("value", "v")):
            yield TensorRule(hf + f"attention.self.{hf_qkv}.weight", att + (our_qkv, "w"),
                             heads_in(n, h))
            yield TensorRule(hf + f"attention.self.{hf_qkv}.bias", att + (our_qkv, "b"),
                             heads_bias(n, h))
        yield TensorRule(hf + "attention.output.dense.weight", att + ("o", "w"), heads_out(n, h))
        yield TensorRule(hf + "attention.output.dense.bias", att + ("o", "b"))
        yield TensorRule(hf + "attention.output.LayerNorm.weight", ours + ("attention_norm", "scale"))
        yield TensorRule(hf + "attention.output.LayerNorm.bias", ours + ("attention_norm", "bias"))
        yield TensorRule(hf + "intermediate.dense.weight", ours + ("mlp", "up", "w"), LINEAR)
        yield TensorRule(hf + "intermediate.dense.bias", ours + ("mlp", "up", "b"))
        yield TensorRule(hf + "output.dense.weight", ours + ("mlp", "down", "w"), LINEAR)
        yield TensorRule(hf + "output.dense.bias", ours + ("mlp", "down", "b"))
        yield TensorRule(hf + "output.LayerNorm.weight", ours + ("output_norm", "scale"))
        yield TensorRule(hf + "output.LayerNorm.bias", ours + ("output_norm", "bias"))


def encoder_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Rules for the transformer body's tensors (names relative to the checkpoint prefix).

    Paths are in the unrolled layout (`encoder/layer_{i}/...`) whatever `cfg.scan_layers`
    says: a scanned tree is stacked / unstacked around them (`embedder.model.layer_stack`)."""
    return list(_gemma_rules(cfg) if cfg.family == "gemma" else _bert_rules(cfg))


def head_rules(cfg: ModelConfig) -> list[TensorRule]:
    """sentence-transformers Dense modules, in order: `linear.weight` of the j-th Dense."""
    return [TensorRule("linear.weight", ("head", f"projection_{j}", "w"), LINEAR)
            for j in range(len(cfg.projection_dims))]


# The tensor whose name fixes the checkpoint prefix ("model.", "bert.", ...).
ANCHORS = {"gemma": "embed_tokens.weight", "bert": "embeddings.word_embeddings.weight"}
# Older BERT checkpoints use TF names for LayerNorm parameters.
LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}


def find_prefix(names, family: str) -> str:
    """The common prefix of the body's tensors, e.g. '' or 'model.' or 'bert.'."""
    anchor = ANCHORS[family]
    hits = sorted(name[: -len(anchor)] for name in names if name.endswith(anchor))
    if not hits:
        raise ValueError(f"no tensor named '*{anchor}' in the checkpoint; it does not look like a "
                         f"{family} model (first names: {sorted(names)[:5]})")
    return hits[0]


def canonical_name(name: str) -> str:
    for old, new in LEGACY_SUFFIXES.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def params_to_hf(params: dict, cfg: ModelConfig, prefix: str = "") -> tuple[dict, list[dict]]:
    """Our params -> (`{hf_name: array}` for the body, `[{"linear.weight": array}]` per Dense).

    A scanned tree (`cfg.scan_layers`) is unstacked first (numpy views, no copies)."""
    if cfg.scan_layers:
        params = unstack_layers(params, cfg)
    body = {prefix + r.hf_name: r.layout.to_hf(np.asarray(get_path(params, r.path)))
            for r in encoder_rules(cfg)}
    dense = [{r.hf_name: r.layout.to_hf(np.asarray(get_path(params, r.path)))}
             for r in head_rules(cfg)]
    return body, dense
