"""Bidirectional multi-head attention (MHA / GQA / MQA) with optional sliding window,
QK-norm, RoPE and logit soft-capping."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from embedder.model.config import ModelConfig
from embedder.model.einsum import Einsum, default_kernel_init
from embedder.model.norms import RMSNorm
from embedder.model.rope import rope_inv_freq, rotate


@flax.struct.dataclass
class PackedMask:
    """What attention needs to know about packed rows (`embedder.data.packing`), passed
    where a `[B, L]` key mask goes: `sequence_ids` `[R, L]` (the sequence each token
    belongs to, -1 on padding) and `positions` `[R, L]` (the token's position within
    its sequence)."""

    sequence_ids: jax.Array
    positions: jax.Array


def attention_mask(key_mask, window: int | None = None, is_local=None):
    """Boolean, broadcastable to `[B, 1, L, L]`: query i may see key j.

    Every query sees every non-padding key; with a `window`, only keys with
    `|i - j| < window` (the symmetric window of bidirectional local layers).
    Under `scan_layers` a traced bool scalar `is_local` (this layer's entry of the
    pattern) decides at run time whether the window applies. A `PackedMask` restricts
    each query to the keys of its own sequence, and the window to positions within it.
    """
    if isinstance(key_mask, PackedMask):
        seq = key_mask.sequence_ids
        mask = (seq[:, None, :, None] == seq[:, None, None, :]) & (seq[:, None, None, :] >= 0)
        pos = key_mask.positions[:, None]  # [R, 1, L]: positions within each sequence
    else:
        key_mask = jnp.asarray(key_mask).astype(bool)
        mask = key_mask[:, None, None, :]
        pos = jnp.arange(key_mask.shape[-1])[None, None]
    if window is not None:
        near = jnp.abs(pos[..., :, None] - pos[..., None, :]) < window
        if is_local is not None:
            near = near | ~is_local
        mask = mask & near
    return mask


def _softcap(x, cap):
    return jnp.tanh(x / cap) * cap


class Attention(nn.Module):
    """Self-attention over `[B, L, D]` with `layer_type` "global" or "local".

    Under `scan_layers` a model that mixes both kinds passes `is_local` (a traced bool
    scalar) instead, and the window and RoPE frequencies are selected at run time.
    The gemma family rotates q/k with RoPE (local and global bases differ) and
    can QK-normalise; the bert family has biases and no RoPE.
    """

    config: ModelConfig
    layer_type: str = "global"

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool = True, is_local=None):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        bert = cfg.family == "bert"

        def proj(name, heads, head_axis):
            return Einsum(
                (d, heads, h), ("embed", head_axis, "head_dim"), dtype=dtype, param_dtype=pdtype,
                bias_shape=(heads, h) if bert else None,
                bias_axes=(head_axis, "head_dim") if bert else None, name=name)

        q = proj("q", n, "heads")("BLD,DNH->BLNH", x)
        key = proj("k", k, "kv_heads")("BLD,DKH->BLKH", x)
        value = proj("v", k, "kv_heads")("BLD,DKH->BLKH", x)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "head_dim"))
        value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "head_dim"))

        if cfg.use_qk_norm:
            q = RMSNorm(cfg.norm_eps, pdtype, name="q_norm")(q)
            key = RMSNorm(cfg.norm_eps, pdtype, name="k_norm")(key)
        local = self.layer_type == "local"
        if not bert:
            local_freq = rope_inv_freq(h, base=cfg.rope_base_local)
            global_freq = rope_inv_freq(h, base=cfg.rope_base_global, scale_factor=cfg.rope_scale_global)
            # Scanned mixed layers select the frequencies (not the rotated q/k): one rotation per layer.
            inv_freq = (jnp.where(is_local, local_freq, global_freq) if is_local is not None
                        else local_freq if local else global_freq)
            positions = (key_mask.positions if isinstance(key_mask, PackedMask)
                         else jnp.arange(x.shape[1]))
            q = rotate(q, positions, inv_freq)
            key = rotate(key, positions, inv_freq)

        scale = (cfg.query_pre_attn_scalar or h) ** -0.5
        if is_local is not None:
            mask = attention_mask(key_mask, cfg.sliding_window, is_local)
        else:
            mask = attention_mask(key_mask, cfg.sliding_window if local else None)
        use_dropout = cfg.attention_dropout_rate > 0 and not deterministic
        if cfg.attention_impl != "xla" and not use_dropout:
            # jax.nn.dot_product_attention has no soft-cap or dropout (config validation
            # rejects a soft-cap; training with attention dropout takes the einsum path).
            out = jax.nn.dot_product_attention(
                q, key, value, mask=mask, scale=scale,
                implementation="cudnn" if cfg.attention_impl == "cudnn" else None)
        else:
            out = self._einsum_attention(q, key, value, mask, scale, deterministic)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        # Token rows ([B * L, ...]) keep the output bias gradient a one-axis sum (feedforward.py).
        rows = out.reshape(-1, n, h)
        return Einsum((n, h, d), ("heads", "head_dim", "embed"), dtype=dtype, param_dtype=pdtype,
                      kernel_init=default_kernel_init(fan_in_axes=2),
                      bias_shape=(d,) if bert else None, bias_axes=("embed",) if bert else None,
                      name="o")("TNH,NHD->TD", rows).reshape(x.shape[:2] + (d,))

    def _einsum_attention(self, q, key, value, mask, scale, deterministic):
        """Softmax attention with the normalisation deferred past the value product.

        `exp(logits - max)` multiplies the values first and the `[B, T, N, H]` result is
        divided by the row sums, as flash attention does: one pass over the `[B, N, T, S]`
        probabilities fewer than `softmax(logits) @ values`, and dropout (elementwise, so
        it commutes with the row division) drops the same entries of the same weights.
        Multi-head attention takes 4-D einsums on heads-major `[B, N, T, H]` operands:
        XLA:CPU transposes the size-1 group axis of the 5-D grouped form through copies of
        the whole logits tensor, and the heads-major layout makes both dots plain batched
        GEMMs.
        """
        cfg = self.config
        b, length, n, h = q.shape
        k = key.shape[2]
        if k == n:
            q, key, value = (jnp.swapaxes(x, 1, 2) for x in (q, key, value))  # [B, N, T, H]
            logits_eq, out_eq, visible = "BNTH,BNSH->BNTS", "BNTS,BNSH->BNTH", mask
        else:  # query head n = kv_head * group + g, the order HF's repeat_kv uses
            q = q.reshape(b, length, k, n // k, h)
            logits_eq, out_eq = "BTKGH,BSKH->BKGTS", "BKGTS,BSKH->BTKGH"
            visible = mask[:, :, None]
        logits = jnp.einsum(logits_eq, q, key, preferred_element_type=jnp.float32)
        logits = logits * jnp.float32(scale)
        if cfg.attn_logit_softcap:
            logits = _softcap(logits, cfg.attn_logit_softcap)
        # A finite fill keeps rows with no visible key (padding queries far from any
        # real token in a local layer) finite, so masked pooling never meets NaN.
        logits = logits + jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)
        weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        row_sums = jnp.sum(weights, axis=-1)  # [B, N, T] or [B, K, G, T]
        weights = weights.astype(value.dtype)
        if cfg.attention_dropout_rate > 0 and not deterministic:
            weights = nn.Dropout(cfg.attention_dropout_rate)(weights, deterministic=False)
        out = jnp.einsum(out_eq, weights, value, preferred_element_type=jnp.float32)
        if k == n:
            out = jnp.swapaxes(out / row_sums[..., None], 1, 2)
        else:
            out = out / jnp.moveaxis(row_sums, -1, 1)[..., None]  # T next to B, as in `out`
        return out.reshape(b, length, n, h).astype(value.dtype)
