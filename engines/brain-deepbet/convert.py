"""Convert deepbet 1.0.2's two TorchScript LinkNet3d models to ONNX (opset 17), reproducibly.

Run (needs torch, onnx, onnxruntime and the ``deepbet`` 1.0.2 wheel installed; conversion time only)::

    python engines/brain-deepbet/convert.py --out engines/brain-deepbet

deepbet (MIT, Medical Machine Learning Lab, University of Münster; Fisch et al. 2024) ships its weights
inside the wheel as TorchScript: ``data/models/bbox_model.pt`` (the locator, run on the whole image
resized to 128³) and ``data/models/model.pt`` (the brain network, run on the locator's box resized to
256³), installed by pip next to the ``deepbet`` package (``<site-packages>/data/models``; deepbet's
``DATA_PATH``). Both are the same LinkNet3d (2 126 258 parameters each): Conv3d, InstanceNorm3d
(no affine, no running statistics), ReLU, MaxPool3d, ConvTranspose3d and a final softmax over
two channels (background, brain) — all plain ONNX operators.

The ONNX graphs are exported from the TorchScript modules by PyTorch's TorchScript-based exporter
(``dynamo=False``) with a fixed input shape (1, 1, S, S, S) for S = 128 and 256 (the only shapes
deepbet runs them at) and a dynamic batch; input ``image``, output ``probabilities`` (1, 2, S, S, S),
the softmax deepbet thresholds at 0.5 on channel 1. The script then runs ONNX Runtime and PyTorch on
the same random input (seed 0) and prints the largest |difference|, and writes each file's sha256.
The bytes depend on the torch and onnx versions used (recorded in each graph's producer fields).

Numerics: ONNX Runtime's InstanceNormalization sums millions of voxels in float32 and drifts (on the
random 256³ input: 6.0e-3 from a float64 PyTorch run, where PyTorch float32 is 4.2e-4 off). Every
InstanceNormalization (deepbet's have no affine part: scale 1, bias 0) is therefore rewritten as
means taken one axis at a time (W, then H, then D: at most 256 terms per sum), ``(x − mean) /
sqrt(mean((x − mean)²) + ε)`` — the same formula (population variance, ε = 1e-5), 2.2e-4 from
float64 and ~25 % faster in ONNX Runtime on 2 cores (2.3 s instead of 3.0 s for the 256³ block).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 17
#: (file written, deepbet's TorchScript file, the cube edge deepbet runs it at)
MODELS = (("bbox.onnx", "bbox_model.pt", 128), ("brain.onnx", "model.pt", 256))
#: Largest |ONNX Runtime − PyTorch| of a softmax probability accepted on the random input.
MAX_ABS_DIFFERENCE = 1e-3


def deepbet_models_dir() -> Path:
    """Where pip put deepbet's TorchScript weights (deepbet.utils.DATA_PATH/models)."""
    from deepbet.utils import DATA_PATH

    path = Path(DATA_PATH) / "models"
    if not (path / "model.pt").is_file():
        raise FileNotFoundError(f"{path} holds no model.pt; is deepbet 1.0.2 installed (pip install deepbet==1.0.2)?")
    return path


def export(source: Path, target: Path, size: int) -> None:
    import torch

    model = torch.jit.load(str(source), map_location="cpu").eval()
    example = torch.zeros((1, 1, size, size, size), dtype=torch.float32)
    torch.onnx.export(model, (example,), str(target), input_names=["image"], output_names=["probabilities"],
                      opset_version=OPSET, dynamic_axes={"image": {0: "n"}, "probabilities": {0: "n"}},
                      do_constant_folding=True, dynamo=False)
    onnx.save(split_instance_norm(onnx.load(str(target))), str(target))


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}


def split_instance_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every InstanceNormalization (scale 1, bias 0) as per-axis ReduceMeans: see the module's Numerics."""
    graph = model.graph
    constants = _constants(graph)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "InstanceNormalization":
            nodes.append(node)
            continue
        x, scale, bias = node.input
        if not (np.all(constants[scale] == 1) and np.all(constants[bias] == 0)):
            raise ValueError(f"{node.name}: an instance norm with an affine part; this rewrite expects none")
        epsilon = next(a.f for a in node.attribute if a.name == "epsilon")
        p = node.name

        def mean(source: str, tag: str, p: str = p) -> tuple[list[onnx.NodeProto], str]:
            w, h, d = f"{p}/{tag}_w", f"{p}/{tag}_h", f"{p}/{tag}_d"
            return [helper.make_node("ReduceMean", [source], [w], axes=[4], keepdims=1),
                    helper.make_node("ReduceMean", [w], [h], axes=[3], keepdims=1),
                    helper.make_node("ReduceMean", [h], [d], axes=[2], keepdims=1)], d

        first, average = mean(x, "mean")
        centred, squared, eps = f"{p}/centred", f"{p}/squared", f"{p}/epsilon"
        second, variance = mean(squared, "variance")
        nodes += first + [helper.make_node("Sub", [x, average], [centred]),
                          helper.make_node("Mul", [centred, centred], [squared])] + second + [
            helper.make_node("Constant", [], [eps], value=numpy_helper.from_array(np.array(epsilon, np.float32), eps)),
            helper.make_node("Add", [variance, eps], [f"{p}/variance_eps"]),
            helper.make_node("Sqrt", [f"{p}/variance_eps"], [f"{p}/std"]),
            helper.make_node("Div", [centred, f"{p}/std"], [node.output[0]]),
        ]
    used = {name for n in nodes for name in n.input}
    del graph.node[:]
    graph.node.extend(n for n in nodes if not (n.op_type == "Constant" and n.output[0] not in used))
    onnx.checker.check_model(model)
    return model


def check(source: Path, target: Path, size: int) -> float:
    """Largest |ONNX Runtime − PyTorch| on one random (1, 1, S, S, S) input in [0, 1] (deepbet's scale)."""
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(0).random((1, 1, size, size, size), dtype=np.float32)
    model = torch.jit.load(str(source), map_location="cpu").eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], {"image": x})
    if got.shape != expected.shape:
        raise ValueError(f"{target.name}: ONNX output shape {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert deepbet 1.0.2's TorchScript models to ONNX.")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for bbox.onnx and brain.onnx")
    ap.add_argument("--models", type=Path, default=None, help="deepbet's data/models folder (default: the installed)")
    args = ap.parse_args(argv)
    models = args.models or deepbet_models_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name, source_name, size in MODELS:
        source, target = models / source_name, args.out / name
        export(source, target, size)
        difference = check(source, target, size)
        verdict = "ok" if difference <= MAX_ABS_DIFFERENCE else f"FAIL (> {MAX_ABS_DIFFERENCE})"
        status |= 0 if difference <= MAX_ABS_DIFFERENCE else 1
        print(f"{target} from {source_name} input (1, 1, {size}, {size}, {size}) bytes={target.stat().st_size} "
              f"sha256={sha256_file(target)} max|onnxruntime - torch|={difference:.2e} {verdict}")
    return status


if __name__ == "__main__":
    sys.exit(main())
