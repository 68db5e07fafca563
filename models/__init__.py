"""What sdonnx ships besides code: the embedded default model and model-family configs.

EMBEDDED_MODEL is the runtime-ready (exported ONNX) folder of a small text-to-image model trained
here on procedural drawings (see draw.py, train.py); `sdonnx generate` and `Pipeline.load()` use it
when no model is named. The configs (SD 1.x / 2.x / SDXL base architectures, the CLIP tokenizer) let
single-file checkpoints convert offline, and tests build tiny models with the real CLIP vocabulary.
"""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
CLIP_TOKENIZER = CONFIGS / "clip-tokenizer"
EMBEDDED_MODEL = Path(__file__).resolve().parent / "embedded" / "onnx"
