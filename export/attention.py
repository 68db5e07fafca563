"""How the U-Net's attention is traced: head by head ("sliced") or as ONNX Runtime's fused op ("fused").

At 512x512 the U-Net's first self-attention runs over 4096 tokens: the scores of all 8 heads are
8 x 4096 x 4096 floats (537 MB per image), and with diffusers' own processor ("full") ONNX Runtime
materializes them, with the softmax's output beside them.

- sliced: standard ONNX ops, self-attention exported one head at a time (a loop over the model's
  fixed head count, so batch and image size stay dynamic); each head's scores are freed before the
  next head's exist. Runs anywhere ONNX runs.
- fused: every attention (self and cross) becomes one com.microsoft.MultiHeadAttention node, the op
  ONNX Runtime's transformer optimizer produces. Its CPU kernel computes attention in blocks (MLAS
  flash attention); the CUDA and DirectML providers have kernels for it too. The VAE's mid-block
  attention (group norm before, residual after, on a [B, C, H, W] map) is fused the same way: over a
  128x128 latent (1024 px SDXL, the x4 upscaler's 512 px) its scores alone are 1 GB per copy.
  Emitted at export rather than fused afterwards with ORT's optimizer: that pass needs ~5x the graph
  in RAM (16 GB for SD 1.5), turns CPU self-attention into the `Attention` op, which has no blocked
  CPU kernel, and its head-count detection fails under NumPy >= 2.4 (benchmarks/ort_optimizer.py
  measures it all).

Attention with masks, norms or residual variants keeps diffusers' own processor in both modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _plain(attn, hidden_states, attention_mask) -> bool:
    """Whether this call is the plain softmax(q k^T * scale) v that the replacements compute."""
    return (
        attention_mask is None
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_cross is None
        and getattr(attn, "norm_q", None) is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
        and hidden_states.ndim == 3
    )


def _vae_style(attn, hidden_states, attention_mask) -> bool:
    """Whether this call is the VAE's: group norm, then plain attention on the map's pixels, then the
    residual and the output rescale (diffusers' AttnProcessor2_0 for such a module)."""
    return (
        attention_mask is None
        and attn.spatial_norm is None
        and attn.norm_cross is None
        and getattr(attn, "norm_q", None) is None
        and hidden_states.ndim in (3, 4)
    )


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, heads * d] -> [B, heads, S, d]"""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, S, d] -> [B, S, heads * d]"""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


class HeadSlicedSelfAttention:
    """An attention processor for diffusers' `Attention` that computes self-attention per head."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is not None or not _plain(attn, hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        query, key, value = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        outputs = [
            F.scaled_dot_product_attention(
                query[:, h : h + 1], key[:, h : h + 1], value[:, h : h + 1], scale=attn.scale
            )
            for h in range(attn.heads)
        ]
        return attn.to_out[1](attn.to_out[0](_merge(torch.cat(outputs, dim=1))))


class _MultiHeadAttention(torch.autograd.Function):
    """query [B, S, D], key [B, L, D], value [B, L, Dv] -> [B, S, Dv]; traced as one ORT contrib op."""

    @staticmethod
    def forward(ctx, query, key, value, heads: int, scale: float):
        q, k, v = (_heads(x, heads) for x in (query, key, value))
        return _merge(F.scaled_dot_product_attention(q, k, v, scale=scale))

    @staticmethod
    def symbolic(g, query, key, value, heads: int, scale: float):
        output = g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads, scale_f=scale)
        output.setType(query.type())
        return output


class FusedAttention:
    """An attention processor for diffusers' `Attention` traced as com.microsoft.MultiHeadAttention."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if _plain(attn, hidden_states, attention_mask):
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            output = _MultiHeadAttention.apply(
                attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads, float(attn.scale)
            )
            return attn.to_out[1](attn.to_out[0](output))
        if not _vae_style(attn, hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual, shape = hidden_states, hidden_states.shape
        if len(shape) == 4:  # [B, C, H, W] -> [B, H*W, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        output = _MultiHeadAttention.apply(
            attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads, float(attn.scale)
        )
        output = attn.to_out[1](attn.to_out[0](output))
        if len(shape) == 4:
            output = output.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            output = output + residual
        return output / attn.rescale_output_factor


PROCESSORS = {"sliced": HeadSlicedSelfAttention, "fused": FusedAttention}


def set_attention(model, mode: str) -> None:
    """Give every attention module of `model` (a U-Net, a VAE) the processor of `mode` ("full" keeps
    diffusers' own; "sliced" leaves what is not plain self-attention, the VAE's, as it is)."""
    if mode in PROCESSORS and getattr(model, "attn_processors", None):
        model.set_attn_processor({name: PROCESSORS[mode](p) for name, p in model.attn_processors.items()})
