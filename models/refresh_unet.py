"""Re-export the embedded model's U-Net graph with the current exporter, from the fp32 weights that
graph holds, and swap it into models/embedded/onnx (the other graphs and their numbers stay).

The committed source folder keeps fp16 weights (half the bytes); exporting from it would round every
graph's weights and shift every measured number. The committed U-Net graph still has the trained
fp32 weights, so the U-Net is rebuilt from them (`fp32_unet`), exported
again (now with the optional ControlNet residual inputs, a weight map), checked to give the old
graph's output without residuals (max |Δ| <= 1e-6), and the manifest's unet entry and file hash
updated.

    python -m sdonnx.models.refresh_unet            # rewrites models/embedded/onnx/unet/model.onnx
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from sdonnx.errors import ExportError

EMBEDDED = Path(__file__).resolve().parent / "embedded"
PREFIX = "unet."
MAX_DIFF = 1e-6


def fp32_unet(onnx_folder: Path, source: Path):
    """The source's UNet2DConditionModel with the fp32 weights of onnx_folder/unet/model.onnx.

    Most initializers keep their parameter's name (`unet.<name>`); the exporter renamed the rest
    (attention projections stored transposed, group norms folded into Constants). Those are found by
    value: the one fp32 tensor of the graph, as stored or transposed, that rounds to the source's fp16
    parameter; two candidates, or none, is an error.
    """
    import onnx
    import torch
    from diffusers import UNet2DConditionModel
    from onnx import numpy_helper

    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    rounded = {name: t.float().numpy().astype(np.float16) for name, t in unet.state_dict().items()}
    unet = unet.float()
    graph = onnx.load(str(onnx_folder / "unet" / "model.onnx")).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors |= {node.output[0]: numpy_helper.to_array(a.t) for node in graph.node if node.op_type == "Constant"
                for a in node.attribute if a.HasField("t")}
    weights = {}
    for name, target in rounded.items():
        named = tensors.get(PREFIX + name)
        if named is not None and named.shape == target.shape:
            weights[name] = named
            continue
        found = [form for v in tensors.values() if v.dtype == np.float32 and v.size == target.size
                 for form in (v.reshape(target.shape), v.T.reshape(target.shape) if v.ndim == 2 else None)
                 if form is not None and np.array_equal(form.astype(np.float16), target)]
        if len(found) != 1:
            raise ExportError(f"{onnx_folder}: {len(found)} tensors of the U-Net graph round to {name!r}, expected 1")
        weights[name] = found[0]
    unet.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in weights.items()})
    return unet


def refresh(folder: Path = EMBEDDED) -> None:
    import onnxruntime as ort

    from sdonnx.export import ExportConfig, export_model
    from sdonnx.runtime.manifest import Manifest, sha256_file

    onnx_folder, source = folder / "onnx", folder / "source"
    old = Manifest.read(onnx_folder)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "source"
        shutil.copytree(source, staged)
        shutil.rmtree(staged / "unet")
        fp32_unet(onnx_folder, source).save_pretrained(staged / "unet", safe_serialization=True)
        new = export_model(ExportConfig(str(staged), Path(tmp) / "onnx", attention=old.unet_attention or "sliced",
                                        quiet=True))
        rng = np.random.default_rng(0)
        feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
                 "timestep": np.asarray(500.0, np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, old.cross_attention_dim), dtype=np.float32)}
        outputs = [ort.InferenceSession(str(f / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
                   .run(None, feeds)[0] for f in (onnx_folder, Path(tmp) / "onnx")]
        diff = float(np.abs(outputs[0] - outputs[1]).max())
        if diff > MAX_DIFF:
            raise ExportError(f"the re-exported U-Net differs from the committed one by {diff:.3g} (> {MAX_DIFF})")
        shutil.copy(Path(tmp) / "onnx" / "unet" / "model.onnx", onnx_folder / "unet" / "model.onnx")
    files = dict(old.files)
    files["unet/model.onnx"] = sha256_file(onnx_folder / "unet" / "model.onnx")
    graphs = dict(old.graphs)
    graphs["unet"] = new.graphs["unet"]
    updated = replace(old, graphs=graphs, files=files, versions=new.versions)
    (onnx_folder / "manifest.json").write_text(updated.to_json(), encoding="utf-8")
    optional = [t.name for t in new.graphs["unet"].optional]
    print(json.dumps({"max_abs_diff_vs_committed": diff, "optional_inputs": optional}))


if __name__ == "__main__":
    refresh()
