"""Self-attention exported one head at a time, so ONNX Runtime holds one head's scores, not all.

At 512x512 the U-Net's first self-attention runs over 4096 tokens: the scores of all 8 heads are
8 x 4096 x 4096 floats (537 MB per image) and ONNX Runtime materializes them, with the softmax's
output beside them. Exported head by head (a loop over the model's fixed head count, so batch and
image size stay dynamic), each head's scores are freed before the next head's exist.

The math is diffusers' AttnProcessor2_0 with the heads split; cross-attention (77 keys) and
attention with masks, norms or residual variants keep diffusers' own processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class HeadSlicedSelfAttention:
    """An attention processor for diffusers' `Attention` that computes self-attention per head."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        plain = (
            encoder_hidden_states is None
            and attention_mask is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and not attn.residual_connection
            and attn.rescale_output_factor == 1.0
            and hidden_states.ndim == 3
        )
        if not plain:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch, tokens, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch, tokens, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        outputs = [
            F.scaled_dot_product_attention(
                query[:, h : h + 1], key[:, h : h + 1], value[:, h : h + 1], scale=attn.scale
            )
            for h in range(attn.heads)
        ]
        hidden_states = torch.cat(outputs, dim=1).transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def slice_self_attention(unet) -> None:
    """Give every attention module of `unet` the head-sliced processor (keeping its own as fallback)."""
    unet.set_attn_processor({name: HeadSlicedSelfAttention(p) for name, p in unet.attn_processors.items()})
