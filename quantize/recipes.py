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
    # int8 MatMuls, fp32 convolutions: the closest to fp32 of the int8 recipes (SD 1.5 image 49.4 dB
    # vs int8's 43.6), at 1.31x smaller instead of 3.99x (convolutions hold 73% of the weights).
    "mixed": {"text_encoder": "int8", "unet": "int8-matmul", "vae_encoder": "fp32", "vae_decoder": "fp32"},
}
# SDXL's second text encoder is a CLIP text model like the first, and gets the same precision; the shallow
# U-Net (feature caching) the U-Net's, dynamic where the U-Net's is static (it has no calibration data).
_NO_CALIBRATION = {"int8-static": "int8", "int8-static-a16": "int8"}
RECIPES = {name: {**recipe, "text_encoder_2": recipe["text_encoder"],
                  "unet_shallow": _NO_CALIBRATION.get(recipe["unet"], recipe["unet"])}
           for name, recipe in RECIPES.items()}
# The default, for CPU laptops: no calibration run, and on SD 1.5 at 256 px (2 cores, AVX-512 VNNI;
# benchmarks/results/quantize-sd15.md) it is smaller (822 vs 2507 MB), faster per U-Net call (0.74 vs
# 0.79 s) and lighter (1.99 vs 3.80 GB peak RSS) than mixed, and keeps the embedded model's judge
# figures within 3 points of fp32. int8-static is faster still (0.46 s) but needs a calibration run
# and costs 6-10 points of object colour and shape on the embedded model.
DEFAULT_RECIPE = "int8"
DEFAULT_BLOCK_SIZE = 128  # int4: weights per scale along K (MatMulNBits' own default)
DEFAULT_CALIBRATION_STEPS = 4  # int8-static*: sampler steps per calibration prompt
