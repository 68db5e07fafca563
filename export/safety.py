"""Export diffusers' StableDiffusionSafetyChecker to safety_checker/model.onnx, as optimum does.

The graph is the checker's `forward_onnx` (the vectorized form diffusers wrote for ONNX), inputs
`clip_input` [B, 3, S, S] and `images` [B, H, W, 3], outputs `out_images` (flagged ones zeroed) and
`has_nsfw_concepts` bool [B]. Its CLIP preprocessing config is written beside it as
feature_extractor/preprocessor_config.json; the runtime reads both (runtime/safety.py). It is checked
against PyTorch like every graph, at another batch and image size than it was traced with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdonnx.export.check import check_graph
from sdonnx.runtime.safety import FEATURE_EXTRACTOR

GRAPH = "safety_checker/model.onnx"
INPUTS, OUTPUTS = ("clip_input", "images"), ("out_images", "has_nsfw_concepts")


class _Checker(torch.nn.Module):
    """forward_onnx's scores and flags, with the flagged images zeroed by a multiply: its in-place
    boolean assignment traces with the trace's image shape baked in."""

    def __init__(self, checker):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input, images):
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        c = self.checker
        image_embeds = c.visual_projection(c.vision_model(clip_input)[1])
        special = cosine_distance(image_embeds, c.special_care_embeds) - c.special_care_embeds_weights
        adjustment = torch.any(special > 0, dim=1).to(image_embeds.dtype).unsqueeze(1) * 0.01
        scores = cosine_distance(image_embeds, c.concept_embeds) - c.concept_embeds_weights + adjustment
        flagged = torch.any(scores > 0, dim=1)
        return images * (~flagged).to(images.dtype).view(-1, 1, 1, 1), flagged


def export_safety_checker(checker, feature_extractor: dict, folder: Path, *, opset: int, min_psnr: float) -> dict:
    """Write the checker's graph and preprocessing config into `folder`; its parity with PyTorch."""
    from sdonnx.export.graphs import Graph, export_graph

    size = int(checker.config.vision_config.image_size)
    generator = torch.Generator().manual_seed(0)

    def example(batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn((batch, 3, size, size), generator=generator),
                torch.rand((batch, height, width, 3), generator=generator))

    axes = {"clip_input": {0: "batch_size"}, "images": {0: "batch_size", 1: "height", 2: "width"},
            "out_images": {0: "batch_size", 1: "height", 2: "width"}, "has_nsfw_concepts": {0: "batch_size"}}
    graph = Graph("safety_checker", _Checker(checker).eval(), INPUTS, OUTPUTS, axes, example(1, 40, 48),
                  example(3, 24, 32))
    path = Path(folder) / GRAPH
    cases = graph.cases()
    export_graph(graph, path, opset=opset)
    parity = check_graph("safety_checker", path, cases, min_psnr=min_psnr)
    extractor = Path(folder) / FEATURE_EXTRACTOR
    extractor.parent.mkdir(parents=True, exist_ok=True)
    extractor.write_text(json.dumps(feature_extractor, indent=2) + "\n", encoding="utf-8")
    return parity.as_dict()
