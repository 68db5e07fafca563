"""The runtime and the server never import torch, diffusers, transformers, optimum or onnx, not even lazily.

A fresh interpreter blocks them with a meta-path finder, imports every runtime module, builds the
whole `sdonnx` command line (export and quantize register their subcommands without their extras),
loads the optimum fixture and generates an image, then runs `sdonnx generate` with no model named
(the embedded one), as a fresh `pip install sdonnx` would. Any attempt to import a blocked package fails the test,
including one that the importing code would have caught and survived.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# onnx (and onnx-ir) belong to the export and quantize extras, not to `pip install sdonnx`.
BLOCKED = ("torch", "diffusers", "transformers", "optimum", "onnx", "onnx_ir")

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{{name}} is blocked: the runtime must not import it")
            return None

    sys.meta_path.insert(0, Block())

    import sdonnx
    import sdonnx.runtime
    modules = [m.name for m in pkgutil.iter_modules(sdonnx.runtime.__path__)]
    for name in modules:
        importlib.import_module(f"sdonnx.runtime.{{name}}")
    import sdonnx.serve
    for name in [m.name for m in pkgutil.iter_modules(sdonnx.serve.__path__)]:  # the server's too
        importlib.import_module(f"sdonnx.serve.{{name}}")
    import sdonnx.cli
    sdonnx.cli.build_parser().parse_args(["quantize", "in", "out"])
    import sdonnx.models.evaluate, sdonnx.models.grid

    pipe = sdonnx.Pipeline.load({fixture!r}, progress=False)
    images = pipe("a red cube", steps=2, seed=0, height=16, width=16)
    assert images[0].size == (16, 16), images[0].size
    code = sdonnx.cli.main(["generate", "a red circle on a blue background", "-o", {png!r}, "--steps", "4",
                            "--seed", "0", "--quiet"])
    assert code == 0, code

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if attempts or loaded:
        sys.exit(f"blocked packages imported: attempts {{attempts}}, loaded {{loaded}}")
    print("modules:", " ".join(sorted(modules)))
    """
)


def test_runtime_imports_no_torch_stack(optimum_fixture, tmp_path):
    script = SCRIPT.format(blocked=BLOCKED, fixture=str(optimum_fixture), png=str(tmp_path / "out.png"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for module in ("cli", "images", "model", "pipeline", "providers", "session", "tokenizer"):
        assert module in result.stdout.split(), result.stdout
    assert (tmp_path / "out.png").stat().st_size > 0
