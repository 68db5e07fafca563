"""Text encoders saved as the hub's Stable Diffusion checkpoints lay them out.

transformers 5 saves CLIPTextModel's weights without the `text_model.` prefix; transformers 4.x
(and so optimum-onnx 0.1.0, which needs it) then matches none of them and silently starts from
random weights. Hub checkpoints keep the prefix and both versions load that, so ours do too.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "text_model."
_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def save_text_encoder(text_encoder, folder: Path) -> None:
    """save_pretrained (safetensors), then the weights renamed to the `text_model.`-prefixed layout."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    text_encoder.save_pretrained(folder, safe_serialization=True)
    path = Path(folder) / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {_prefixed(key): f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)


def _prefixed(key: str) -> str:
    return PREFIX + key if key.startswith(_TEXT_MODEL_PARTS) else key
