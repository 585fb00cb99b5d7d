"""Architecture configs: one frozen `ModelConfig` dataclass and the named sizes.

Every knob of the encoder families (gemma, bert), the heads and the performance
settings is a field, so a saved model spec fully determines the network.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("gemma", "bert")
ACTIVATIONS = ("gelu_tanh", "gelu")
REMAT_POLICIES = ("none", "full", "dots_saveable")
ATTENTION_IMPLS = ("xla", "dot_product_attention", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
LAYER_TYPES = ("global", "local")


# Fields that say how a model trains or runs, not which function its parameters compute:
# models that differ only here share parameters (soups average them; exports and
# `Embedder(config_overrides=...)` may change them).
RUN_FIELDS = ("mrl_dims", "dtype", "remat", "attention_impl", "scan_layers", "dropout_rate",
              "attention_dropout_rate", "quant_scheme", "quant_block")
QUANT_SCHEMES = ("", "int8", "int4", "mixed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Encoder + pooling/projection head. Sizes are per the published HF configs."""

    family: str = "gemma"
    vocab_size: int = 8192
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 16
    mlp_dim: int = 128
    activation: str = "gelu_tanh"
    pad_token_id: int = 0

    # gemma family
    norm_eps: float = 1e-6
    # One entry per layer, "global" (attends everywhere) or "local" (|i - j| < sliding_window).
    layer_types: tuple[str, ...] = ("global", "global")
    sliding_window: int | None = None
    rope_base_global: float = 10_000.0
    rope_base_local: float = 10_000.0
    # Linear RoPE scaling on global layers (Gemma 3 4B+ use 8).
    rope_scale_global: float = 1.0
    # Attention logits are scaled by query_pre_attn_scalar**-0.5 (None: head_dim).
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    # Gemma 2 caps its LM logits; an encoder has none, kept so `to-hf` writes the original value.
    final_logit_softcap: float | None = None
    use_post_attn_norm: bool = False
    use_post_ffw_norm: bool = False
    use_qk_norm: bool = False

    # bert family
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    # heads: bias-free projections after mean pooling; () is the identity (MiniLM).
    projection_dims: tuple[int, ...] = ()
    mrl_dims: tuple[int, ...] = ()

    # performance
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "xla"
    # Run the layers with nn.scan over one block whose params are stacked on a leading
    # "layers" axis (`encoder/layers/...`, shape [num_layers, ...]) instead of unrolling
    # `encoder/layer_{i}`: deep models compile in a fraction of the time. The two layouts
    # convert with embedder.model.layer_stack.{stack_layers, unstack_layers}.
    scan_layers: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    # Quantisation-aware training (embedder.model.quant): the forward runs on the weights fake-
    # quantised by this scheme ("int8" per channel, "int4" per `quant_block` input features,
    # "mixed": int8 attention, int4 the rest), gradients straight through; "" runs the weights as
    # they are. A model trained so keeps the setting: every consumer then runs it quantised.
    quant_scheme: str = ""
    quant_block: int = 32

    def __post_init__(self):
        # JSON round trips give lists; the dataclass must stay hashable (a flax attribute).
        for name in ("layer_types", "projection_dims", "mrl_dims"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        def bad(field, value, fix):
            raise ValueError(f"ModelConfig.{field}={value!r} is invalid: {fix}")

        if self.family not in FAMILIES:
            bad("family", self.family, f"use one of {FAMILIES}")
        if self.activation not in ACTIVATIONS:
            bad("activation", self.activation, f"use one of {ACTIVATIONS}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", self.remat, f"use one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", self.attention_impl, f"use one of {ATTENTION_IMPLS}")
        if not isinstance(self.scan_layers, bool):
            bad("scan_layers", self.scan_layers, "use True (nn.scan over layers) or False (unrolled)")
        if self.quant_scheme not in QUANT_SCHEMES:
            bad("quant_scheme", self.quant_scheme, f"use one of {QUANT_SCHEMES} ('' = no quantisation)")
        if self.quant_block < 0:
            bad("quant_block", self.quant_block, "use 0 (one scale per channel) or a block of input features")
        if self.num_layers < 1:
            bad("num_layers", self.num_layers, "use at least one layer")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                bad(field, getattr(self, field), f"use one of {DTYPES}")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", self.num_kv_heads,
                f"num_heads={self.num_heads} must be a multiple of it (MHA, GQA or MQA)")
        if self.family == "gemma":
            if len(self.layer_types) != self.num_layers:
                bad("layer_types", self.layer_types,
                    f"give one entry per layer ({self.num_layers}), each in {LAYER_TYPES}")
            if any(t not in LAYER_TYPES for t in self.layer_types):
                bad("layer_types", self.layer_types, f"entries must be in {LAYER_TYPES}")
            if "local" in self.layer_types and not self.sliding_window:
                bad("sliding_window", self.sliding_window, "local layers need a positive window")
        if self.attn_logit_softcap and self.attention_impl != "xla":
            bad("attention_impl", self.attention_impl,
                "attention soft-capping needs the 'xla' implementation")
        for i, d in enumerate(self.mrl_dims):
            if d <= 0 or d > self.embedding_dim:
                bad("mrl_dims", self.mrl_dims, f"entry {i} must be in 1..{self.embedding_dim}")

    @property
    def embedding_dim(self) -> int:
        """Width of the model output (last projection, or the hidden size without one)."""
        return self.projection_dims[-1] if self.projection_dims else self.hidden_size

    @property
    def matryoshka_dims(self) -> tuple[int, ...]:
        """The model's Matryoshka dims, which the training loss, evaluation and `Embedder.encode`
        default to: `mrl_dims`, or the full `embedding_dim` alone when it has none."""
        return tuple(self.mrl_dims) or (self.embedding_dim,)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides) -> "ModelConfig":
        return dataclasses.replace(self, **overrides)


def _pattern(num_layers: int, local_per_global: int) -> tuple[str, ...]:
    """Gemma 3's interleaving: `local_per_global` local layers, then one global, repeated."""
    period = local_per_global + 1
    return tuple("global" if (i + 1) % period == 0 else "local" for i in range(num_layers))


def _gemma3(**kw) -> dict[str, Any]:
    base = dict(family="gemma", activation="gelu_tanh", use_post_attn_norm=True,
                use_post_ffw_norm=True, use_qk_norm=True, rope_base_global=1_000_000.0,
                rope_base_local=10_000.0, head_dim=256, query_pre_attn_scalar=256.0)
    base.update(kw)
    base["layer_types"] = _pattern(base["num_layers"], 5)
    return base


_NAMED: dict[str, dict[str, Any]] = {
    # Gemma-style test config: one local and one global layer, small window.
    "tiny": dict(family="gemma", vocab_size=8192, hidden_size=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, mlp_dim=128, layer_types=("local", "global"),
                 sliding_window=4, rope_base_local=10_000.0, rope_base_global=1_000_000.0,
                 query_pre_attn_scalar=16.0, use_post_attn_norm=True, use_post_ffw_norm=True,
                 use_qk_norm=True, projection_dims=(128, 32), mrl_dims=(32, 16, 8)),
    # The demo's from-scratch encoder: tiny but trainable on 2 CPU cores in minutes; the
    # vocabulary matches the shipped Debian SentencePiece model.
    "small": dict(family="gemma", vocab_size=8192, hidden_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=32, mlp_dim=256, layer_types=("local", "global"),
                  sliding_window=32, rope_base_local=10_000.0, rope_base_global=1_000_000.0,
                  query_pre_attn_scalar=32.0, use_post_attn_norm=True, use_post_ffw_norm=True,
                  use_qk_norm=True, projection_dims=(256, 64), mrl_dims=(64, 32, 16)),
    "tiny-bert": dict(family="bert", vocab_size=8192, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=16, mlp_dim=128, activation="gelu",
                      layer_types=(), max_position_embeddings=128, mrl_dims=(64, 32)),
    "gemma-2b": dict(family="gemma", vocab_size=256_000, hidden_size=2048, num_layers=18,
                     num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=16_384,
                     layer_types=("global",) * 18),
    "gemma2-2b": dict(family="gemma", vocab_size=256_000, hidden_size=2304, num_layers=26,
                      num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216,
                      layer_types=("local", "global") * 13, sliding_window=4096,
                      query_pre_attn_scalar=256.0, attn_logit_softcap=50.0,
                      final_logit_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True),
    "gemma3-270m": _gemma3(vocab_size=262_144, hidden_size=640, num_layers=18, num_heads=4,
                           num_kv_heads=1, mlp_dim=2048, sliding_window=512),
    "gemma3-1b": _gemma3(vocab_size=262_144, hidden_size=1152, num_layers=26, num_heads=4,
                         num_kv_heads=1, mlp_dim=6912, sliding_window=512),
    "gemma3-4b": _gemma3(vocab_size=262_208, hidden_size=2560, num_layers=34, num_heads=8,
                         num_kv_heads=4, mlp_dim=10_240, sliding_window=1024,
                         rope_scale_global=8.0),
    "gemma3-12b": _gemma3(vocab_size=262_208, hidden_size=3840, num_layers=48, num_heads=16,
                          num_kv_heads=8, mlp_dim=15_360, sliding_window=1024,
                          rope_scale_global=8.0),
    "gemma3-27b": _gemma3(vocab_size=262_208, hidden_size=5376, num_layers=62, num_heads=32,
                          num_kv_heads=16, head_dim=128, mlp_dim=21_504, sliding_window=1024,
                          query_pre_attn_scalar=168.0, rope_scale_global=8.0),
    # Gemma 3 270M-like body, bidirectional, symmetric window of 257 (HF sliding_window=257),
    # and the 768 -> 3072 -> 768 head; MRL dims from the paper.
    "embeddinggemma-300m": _gemma3(vocab_size=262_144, hidden_size=768, num_layers=24,
                                   num_heads=3, num_kv_heads=1, mlp_dim=1152, sliding_window=257,
                                   projection_dims=(3072, 768), mrl_dims=(768, 512, 256, 128)),
    "minilm-l6": dict(family="bert", vocab_size=30_522, hidden_size=384, num_layers=6,
                      num_heads=12, num_kv_heads=12, head_dim=32, mlp_dim=1536, activation="gelu",
                      layer_types=(), max_position_embeddings=512, pad_token_id=0),
}

MODEL_NAMES = tuple(_NAMED)


def get_model_config(name: str, **overrides) -> ModelConfig:
    """A named architecture (see MODEL_NAMES) with any field overridden, e.g. vocab_size=..."""
    if name not in _NAMED:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    fields = dict(_NAMED[name])
    fields.update(overrides)
    return ModelConfig(**fields)
