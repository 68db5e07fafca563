"""Recipes: which precision each graph of a model folder gets, as plain data.

Precisions (what `convert.CONVERTERS` can produce):
- "fp32": the graph is copied unchanged;
- "fp16": float16 weights and math, fp32 IO; softmax and the normalizations stay fp32 (`convert.FP16_KEEP_FP32`);
- "int8": dynamic quantization: int8 weights, activations quantized at run time (MatMul and Conv);
- "int8-matmul": the same restricted to MatMul/Gemm, so convolutions keep ONNX Runtime's fast fp32 kernels;
- "int8-static": calibrated QDQ (activation ranges recorded by running the fp32 pipeline);
- "int8-static-a16": the same with 16-bit activations, where 8-bit activations cost too much quality;
- "int4": weight-only, block-wise symmetric 4-bit: MatMulNBits on the MatMuls and int4
  DequantizeLinear -> Conv on the convolutions; activations and everything else fp32.

The VAE stays fp32 in every recipe: it runs once per image (its cost does not scale with steps), its
convolutions are what int8 hurts most (colour shifts), and its decoder overflows fp16 in some
families; ONNX Runtime's own Stable Diffusion tooling keeps it fp32 for the same reason. The text
encoder never gets static quantization: its causal mask is a -inf/-3.4e38 constant added before
softmax, which gives calibration a NaN/huge range (see the module docstring of `convert`).
"""

from __future__ import annotations

from typing import Mapping


RECIPES: dict[str, Mapping[str, str]] = {
    "fp16": {"text_encoder": "fp16", "unet": "fp16", "vae_encoder": "fp32", "vae_decoder": "fp32"},
    "int8": {"text_encoder": "int8", "unet": "int8", "vae_encoder": "fp32", "vae_decoder": "fp32"},
    "int8-static": {"text_encoder": "int8", "unet": "int8-static", "vae_encoder": "fp32", "vae_decoder": "fp32"},
    "int8-static-a16": {
        "text_encoder": "int8", "unet": "int8-static-a16", "vae_encoder": "fp32", "vae_decoder": "fp32"
    },
    "int4": {"text_encoder": "int4", "unet": "int4", "vae_encoder": "fp32", "vae_decoder": "fp32"},
    # CPU laptops. Measured on SD 1.5 (random weights, 256 px, 2 cores with AVX-512 VNNI): per-step
    # times of fp32, int8 and this recipe are within run-to-run noise of each other (1.5-1.9 s), and
    # int8 MatMuls with fp32 convolutions keep the image 8 dB closer to fp32 than full int8 (46.5 vs
    # 38.2 dB). Full int8 is the choice when disk and memory matter more (U-Net 0.86 vs 2.6 GB, peak
    # RSS 2.4 vs 4.0 GB): the convolutions hold 73% of the U-Net's weights.
    "mixed": {"text_encoder": "int8", "unet": "int8-matmul", "vae_encoder": "fp32", "vae_decoder": "fp32"},
}
DEFAULT_RECIPE = "mixed"
DEFAULT_BLOCK_SIZE = 128  # int4: weights per scale along K (MatMulNBits' own default)
DEFAULT_CALIBRATION_STEPS = 4  # int8-static*: sampler steps per calibration prompt
