"""Hugging Face `config.json` (Gemma, Gemma2, Gemma3 text, BERT) -> `ModelConfig`."""

from __future__ import annotations

from typing import Any

from embedder.model.config import ModelConfig

GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
BERT_TYPES = ("bert",)
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


def _activation(hf: dict, model_type: str) -> str:
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if name not in _ACTIVATIONS:
        raise ValueError(f"{model_type} config uses activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rope(hf: dict, layer_type: str, default_theta: float) -> tuple[float, float]:
    """(base, linear factor) for 'full_attention' or 'sliding_attention' layers.

    transformers 5 writes `rope_parameters` (per layer type for Gemma 3); older
    files write `rope_theta`, `rope_local_base_freq` and `rope_scaling`.
    """
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        rope_type, theta, factor = params.get("rope_type", "default"), params["rope_theta"], params.get("factor", 1.0)
    else:
        theta = hf.get("rope_theta", default_theta)
        if layer_type == "sliding_attention" and "rope_local_base_freq" in hf:
            theta = hf["rope_local_base_freq"]
        scaling = hf.get("rope_scaling") if layer_type == "full_attention" else None
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        factor = (scaling or {}).get("factor", 1.0)
    if rope_type not in ("default", "linear"):
        raise ValueError(f"RoPE type {rope_type!r} ({layer_type}) is not supported; only default and linear")
    return float(theta), float(factor if rope_type == "linear" else 1.0)


def _gemma(hf: dict, model_type: str) -> dict[str, Any]:
    n_layers = hf["num_hidden_layers"]
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    if "layer_types" in hf and hf["layer_types"]:
        types = hf["layer_types"][:n_layers]
    elif model_type == "gemma2":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    elif model_type.startswith("gemma3"):
        period = hf.get("sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                 for i in range(n_layers)]
    else:
        types = ["full_attention"] * n_layers
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported (sliding_attention, full_attention)")
    layer_types = tuple("local" if t == "sliding_attention" else "global" for t in types)
    base_global, factor = _rope(hf, "full_attention", 10_000.0)
    base_local = _rope(hf, "sliding_attention", 10_000.0)[0] if "local" in layer_types else base_global
    gemma1 = model_type == "gemma"
    gemma3 = model_type.startswith("gemma3")
    window = hf.get("sliding_window") if "local" in layer_types else None
    if window and gemma3 and hf.get("use_bidirectional_attention"):
        # config.json stores the full span; transformers turns it into the exclusive bound
        # of |i - j| < w as sliding_window // 2 + 1 (EmbeddingGemma: 512 -> 257). A causal
        # checkpoint keeps its window as the symmetric bound.
        window = window // 2 + 1
    return dict(
        family="gemma", vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=n_layers,
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads), head_dim=head_dim,
        mlp_dim=hf["intermediate_size"], activation=_activation(hf, model_type),
        pad_token_id=hf.get("pad_token_id") or 0, norm_eps=hf.get("rms_norm_eps", 1e-6),
        layer_types=layer_types,
        sliding_window=window,
        rope_base_global=base_global, rope_base_local=base_local, rope_scale_global=factor,
        query_pre_attn_scalar=None if gemma1 else float(hf.get("query_pre_attn_scalar") or head_dim),
        attn_logit_softcap=None if gemma1 else hf.get("attn_logit_softcapping"),
        final_logit_softcap=None if gemma1 else hf.get("final_logit_softcapping"),
        use_post_attn_norm=not gemma1, use_post_ffw_norm=not gemma1, use_qk_norm=gemma3,
        attention_dropout_rate=float(hf.get("attention_dropout", 0.0) or 0.0))


def _bert(hf: dict) -> dict[str, Any]:
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"BERT position_embedding_type {kind!r} is not supported; only 'absolute'")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    return dict(
        family="bert", vocab_size=hf["vocab_size"], hidden_size=hidden,
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, mlp_dim=hf["intermediate_size"],
        activation=_activation(hf, "bert"), pad_token_id=hf.get("pad_token_id") or 0,
        layer_types=(), max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.0) or 0.0),
        attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.0) or 0.0))


def config_from_hf(hf: dict, *, projection_dims=(), mrl_dims=(), **overrides) -> ModelConfig:
    """Our config for a HF config dict (a multimodal Gemma 3 uses its `text_config`)."""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
        hf = dict(hf["text_config"], model_type="gemma3_text")
        model_type = "gemma3_text"
    if model_type in GEMMA_TYPES:
        fields = _gemma(hf, model_type)
    elif model_type in BERT_TYPES:
        fields = _bert(hf)
    else:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(GEMMA_TYPES + BERT_TYPES)}")
    fields.update(projection_dims=tuple(projection_dims), mrl_dims=tuple(mrl_dims))
    fields.update(overrides)
    return ModelConfig(**fields)


_HF_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _gemma_model_type(cfg: ModelConfig) -> str:
    # The norms a config has tell the generation apart, as `_gemma` set them on import.
    if cfg.use_qk_norm:
        return "gemma3_text"
    return "gemma2" if (cfg.use_post_attn_norm or cfg.use_post_ffw_norm) else "gemma"


def config_to_hf(cfg: ModelConfig, *, max_position_embeddings: int = 2048,
                 special_ids: dict | None = None) -> dict[str, Any]:
    """The transformers `config.json` dict of our config: BertModel, GemmaModel, Gemma2Model or
    Gemma3TextModel (bidirectional). The inverse of `config_from_hf` on the fields we model."""
    if cfg.family == "bert":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
        return {
            "architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_dim, "hidden_act": act,
            "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id,
            "hidden_dropout_prob": cfg.dropout_rate,
            "attention_probs_dropout_prob": cfg.attention_dropout_rate,
            "position_embedding_type": "absolute", "initializer_range": 0.02, "dtype": cfg.param_dtype}
    model_type = _gemma_model_type(cfg)
    types = ["sliding_attention" if t == "local" else "full_attention" for t in cfg.layer_types]
    out = {
        "architectures": [{"gemma": "GemmaModel", "gemma2": "Gemma2Model",
                           "gemma3_text": "Gemma3TextModel"}[model_type]],
        "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_activation": _HF_ACTIVATIONS[cfg.activation],
        "max_position_embeddings": int(max_position_embeddings), "rms_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_token_id, "attention_bias": False,
        "attention_dropout": cfg.attention_dropout_rate, "tie_word_embeddings": True,
        "dtype": cfg.param_dtype, "initializer_range": 0.02}
    out.update(special_ids or {})
    if model_type == "gemma":
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
        return out
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    # transformers' strict configs type this field as int.
    scalar = int(scalar) if float(scalar).is_integer() else scalar
    out.update(query_pre_attn_scalar=scalar,
               attn_logit_softcapping=cfg.attn_logit_softcap,
               final_logit_softcapping=cfg.final_logit_softcap, layer_types=types)
    if model_type == "gemma2":
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
        out["sliding_window"] = cfg.sliding_window or 4096
        return out
    full = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
    if cfg.rope_scale_global != 1.0:
        full = {"rope_type": "linear", "rope_theta": cfg.rope_base_global, "factor": cfg.rope_scale_global}
    out["rope_parameters"] = {"full_attention": full,
                              "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local}}
    # Inverse of the import: transformers attends |i - j| < sliding_window // 2 + 1 when
    # bidirectional, so our exclusive bound w is stored as 2 * (w - 1).
    out["sliding_window"] = 2 * (cfg.sliding_window - 1) if cfg.sliding_window else 512
    out["use_bidirectional_attention"] = True
    return out
