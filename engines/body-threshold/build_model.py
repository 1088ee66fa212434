"""Build model.onnx for the body-threshold bundle with the onnx helper API.

A small, real, hand-weighted network (no training): a 3×3×3 mean-filter convolution followed by a
steep sigmoid around −300 HU gives the probability that a voxel is patient tissue rather than air;
the two output channels are (background, body). Post-processing in the manifest keeps the largest
component (dropping the couch when it is separate) and fills internal air (lungs, bowel) slice by
slice. It brings the whole flow up on real ONNX inference until the bundled CNNs land.

Run: python engines/body-threshold/build_model.py  (then update sha256 in manifest.toml)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

THRESHOLD = -0.3  # normalised units: HU / 1000 → −300 HU
GAIN = 20.0


def build() -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2, "D", "H", "W"])
    kernel = numpy_helper.from_array(np.full((1, 1, 3, 3, 3), 1.0 / 27.0, dtype=np.float32), "mean_kernel")
    threshold = numpy_helper.from_array(np.array(THRESHOLD, dtype=np.float32), "threshold")
    gain = numpy_helper.from_array(np.array(GAIN, dtype=np.float32), "gain")
    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    nodes = [
        helper.make_node("Conv", ["image", "mean_kernel"], ["smoothed"], pads=[1, 1, 1, 1, 1, 1], kernel_shape=[3, 3, 3]),
        helper.make_node("Sub", ["smoothed", "threshold"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p_body"]),
        helper.make_node("Sub", ["one", "p_body"], ["p_background"]),
        helper.make_node("Concat", ["p_background", "p_body"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(nodes, "body_threshold", [image], [probs], [kernel, threshold, gain, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dicom-seg-node")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = Path(__file__).with_name("model.onnx")
    data = build().SerializeToString()
    out.write_bytes(data)
    print(f"{out} sha256={hashlib.sha256(data).hexdigest()}")
