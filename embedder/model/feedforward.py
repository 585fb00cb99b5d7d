"""Feed-forward blocks: Gemma's GeGLU and BERT's GELU MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedder.model.config import ModelConfig
from embedder.model.einsum import Einsum


def activation(name: str, x):
    # HF's gelu_pytorch_tanh is the tanh approximation; BERT's "gelu" is exact (erf).
    return jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


class GatedFeedForward(nn.Module):
    """`down(act(gate(x)) * up(x))`, bias-free (Gemma)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, f = cfg.hidden_size, cfg.mlp_dim
        gate = Einsum((d, f), ("embed", "mlp"), dtype, pdtype, name="gate")("BLD,DF->BLF", x)
        up = Einsum((d, f), ("embed", "mlp"), dtype, pdtype, name="up")("BLD,DF->BLF", x)
        hidden = activation(cfg.activation, gate) * up
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return Einsum((f, d), ("mlp", "embed"), dtype, pdtype, name="down")("BLF,FD->BLD", hidden)


class FeedForward(nn.Module):
    """`down(act(up(x)))` with biases (BERT), over token rows `[B * L, D]`.

    Token rows make a bias gradient a one-axis sum; XLA:CPU's two-axis sum of a `[B, L, F]`
    gradient is several times slower.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, f = cfg.hidden_size, cfg.mlp_dim
        rows = x.reshape(-1, d)
        hidden = Einsum((d, f), ("embed", "mlp"), dtype, pdtype, bias_shape=(f,),
                        bias_axes=("mlp",), name="up")("TD,DF->TF", rows)
        hidden = activation(cfg.activation, hidden)
        hidden = nn.with_logical_constraint(hidden, ("batch", "mlp"))
        out = Einsum((f, d), ("mlp", "embed"), dtype, pdtype, bias_shape=(d,),
                     bias_axes=("embed",), name="down")("TF,FD->TD", hidden)
        return out.reshape(x.shape)
