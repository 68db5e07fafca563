"""Model-family configs bundled with sdonnx (SD 1.x / 2.x architectures, the CLIP tokenizer).

They let single-file checkpoints convert offline, and tests build tiny models with the real
CLIP vocabulary.
"""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
CLIP_TOKENIZER = CONFIGS / "clip-tokenizer"
