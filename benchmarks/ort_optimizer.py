"""ONNX Runtime's transformer optimizer on a U-Net, CPU-safe, against sdonnx's export-time attention modes.

    python benchmarks/ort_optimizer.py FULL_EXPORT --out benchmarks/results/ort-optimizer \
        --compare sliced=SLICED_EXPORT fused=FUSED_EXPORT --size 512 --threads 2

FULL_EXPORT is an fp32 folder exported with `--attention full` (diffusers' attention pattern, which
the optimizer's U-Net fusion matches; optimum's exports have it too). Two graphs are made from its
U-Net and cached under --work (3.4 GB each for SD 1.5):
- "ort-cpu": `optimize_model(model_type="unet")` with the fusions that have no CPU kernel turned off
  (NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, packed QKV/KV). Self-attention then
  becomes the `Attention` op, cross-attention `MultiHeadAttention`.
- "ort-cpu-mha": the same with each `Attention` rewritten as MatMul -> Split -> MultiHeadAttention,
  the op whose CPU kernel is blocked (MLAS flash attention).
Each graph and each --compare graph then runs one CFG U-Net call (batch 2) --repeats times in a
fresh process; the table gives the median call, the optimizer's own time and peak RSS, the call's
peak RSS and the largest difference from the FULL_EXPORT U-Net's output.

NumPy >= 2.4 breaks the optimizer's U-Net attention fusion (onnxruntime/transformers/
fusion_attention_unet.py: `int()` of the 1-element array holding the head count raises). `_numpy2_safe`
swaps in a subclass that reads the count with `.item()` while the optimizer runs; NumPy stays as it is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from common import CACHE, machine, peak_rss_gb

# FusionOptions("unet") flags whose ops have no CPU kernel (or, for packed QKV, no CPU implementation).
CPU_UNSAFE = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
              "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")


@contextmanager
def _numpy2_safe():
    """Run the optimizer's U-Net attention fusion with a head-count reader that works under NumPy 2.4."""
    import numpy as np
    from onnxruntime.transformers import optimizer

    # optimizer.py imports its model classes as top-level modules (its folder is put on sys.path),
    # so the class to patch is the one its MODEL_TYPES table holds, not onnxruntime.transformers'.
    module = sys.modules[optimizer.MODEL_TYPES["unet"][0].__module__]
    original = module.FusionAttentionUnet

    class FusionAttentionUnet(original):
        def get_num_heads(self, reshape_q, is_torch2=False):
            if not is_torch2:
                return super().get_num_heads(reshape_q, is_torch2)
            concat = self.model.get_parent(reshape_q, 1)
            if concat is not None and concat.op_type == "Concat" and len(concat.input) == 4:
                heads = self.model.get_constant_value(concat.input[2])
                if isinstance(heads, np.ndarray) and heads.size == 1 and heads.item() > 0:
                    return int(heads.item())
            return 0

    module.FusionAttentionUnet = FusionAttentionUnet
    try:
        yield
    finally:
        module.FusionAttentionUnet = original


def optimize_cpu(src: Path, dst: Path) -> dict:
    """ORT's U-Net fusions minus CPU_UNSAFE, src -> dst; the fused op counts, seconds and peak RSS."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    for flag in CPU_UNSAFE:
        setattr(options, flag, False)
    started = time.perf_counter()
    with _numpy2_safe():
        model = optimize_model(str(src), model_type="unet", opt_level=0, optimization_options=options, use_gpu=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(dst), use_external_data_format=True)
    return {"fused": {k: v for k, v in model.get_fused_operator_statistics().items() if v},
            "seconds": round(time.perf_counter() - started, 1), "peak_rss_gb": peak_rss_gb()}


def attention_to_mha(src: Path, dst: Path) -> int:
    """Rewrite every com.microsoft.Attention (packed QKV weights) as MatMul -> Split -> MultiHeadAttention."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        qkv, q, k, v = (f"{node.name}_{part}" for part in ("qkv", "q", "k", "v"))
        bias = node.input[2] if len(node.input) > 2 else ""
        nodes += [
            helper.make_node("MatMul", node.input[:2], [qkv], name=f"{node.name}_MatMul"),
            helper.make_node("Split", [qkv], [q, k, v], name=f"{node.name}_Split", axis=-1),
            helper.make_node("MultiHeadAttention", [q, k, v, bias], node.output[:1], name=f"{node.name}_MHA",
                             domain="com.microsoft", num_heads=heads),
        ]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, location="model.onnx.data")
    return count


def unet_call(path: Path, size: int, threads: int, repeats: int, output: Path) -> dict:
    """Worker: one CFG U-Net call, `repeats` times, on seeded inputs; output saved for the diff."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    started = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - started
    rng = np.random.default_rng(0)
    inputs = {i.name: i for i in session.get_inputs()}
    context = inputs["encoder_hidden_states"].shape[-1]
    feeds = {"sample": rng.standard_normal((2, 4, size // 8, size // 8), dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, context), dtype=np.float32),
             "timestep": np.array(500, dtype=np.float32).reshape([1] * len(inputs["timestep"].shape))}
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = session.run(None, feeds)[0]
        seconds.append(time.perf_counter() - started)
    np.save(output, result)
    # The first call allocates ONNX Runtime's buffers; the median leaves it out when there are others.
    return {"load_s": round(load, 2), "call_s": round(statistics.median(seconds[1:] or seconds), 3),
            "calls_s": [round(s, 3) for s in seconds], "peak_rss_gb": peak_rss_gb()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full", type=Path, help="fp32 export with --attention full")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--compare", nargs="*", default=[], metavar="NAME=FOLDER", help="other fp32 exports")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=CACHE / "ort-optimizer", help="optimized graphs and outputs")
    parser.add_argument("--worker", nargs=2, metavar=("GRAPH", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(unet_call(Path(args.worker[0]), args.size, args.threads, args.repeats, Path(args.worker[1]))))
        return

    work = args.work / "graphs"
    graphs = {"full": args.full / "unet" / "model.onnx"}
    graphs |= {name: Path(folder) / "unet" / "model.onnx" for name, folder in (c.split("=", 1) for c in args.compare)}
    record = work / "optimizer.json"
    if not record.is_file():
        # A fresh process, so that its peak RSS is the optimizer's alone.
        code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import ort_optimizer as o; "
                f"print(json.dumps(o.optimize_cpu(o.Path({str(graphs['full'])!r}), "
                f"o.Path({str(work / 'ort-cpu' / 'model.onnx')!r}))))")
        optimizer = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                              text=True).stdout.splitlines()[-1])
        attention_to_mha(work / "ort-cpu" / "model.onnx", work / "ort-cpu-mha" / "model.onnx")
        record.write_text(json.dumps(optimizer) + "\n")
    optimizer = json.loads(record.read_text())
    graphs |= {name: work / name / "model.onnx" for name in ("ort-cpu", "ort-cpu-mha")}

    import numpy as np

    rows = {}
    for name, path in graphs.items():
        output = work / f"{name}-{args.size}.npy"
        command = [sys.executable, __file__, str(args.full), "--out", str(args.out), "--size", str(args.size),
                   "--threads", str(args.threads), "--repeats", str(args.repeats), "--worker", str(path), str(output)]
        rows[name] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(name, rows[name], file=sys.stderr)
    reference = np.load(work / f"full-{args.size}.npy")
    for name in rows:
        rows[name]["max_abs_diff"] = float(np.abs(np.load(work / f"{name}-{args.size}.npy") - reference).max())

    command = "python benchmarks/ort_optimizer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "date": datetime.date.today().isoformat(), "machine": machine(),
              "size": args.size, "threads": args.threads, "optimizer": optimizer, "graphs": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# U-Net attention graphs, one CFG call at {args.size}x{args.size}, {args.threads} threads",
             "", f"`{command}` ({result['date']}, {result['machine']})", "",
             "| graph | call (median) | peak RSS | max diff vs full |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['call_s']:.2f} s | {r['peak_rss_gb']:.2f} GB | {r['max_abs_diff']:.1e} |"
              for n, r in rows.items()]
    lines += ["", f"Optimizer (ort-cpu): {optimizer['seconds']} s, peak RSS {optimizer['peak_rss_gb']:.1f} GB, "
                  f"fused {optimizer['fused']}"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
