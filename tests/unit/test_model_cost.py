"""Model cost (node/infer/model_cost.py): closed forms for the body-threshold network, an independent
Conv MAC count for the liver U-Net (its own shape propagation, not ONNX shape inference), linearity in
the batch, the liveness walk, and errors as sentences."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from node.errors import BundleError
from node.infer.model_cost import ModelCost, model_cost

ENGINES = Path(__file__).resolve().parents[2] / "engines"
LIVER = ENGINES / "liver" / "model.onnx"
BODY = ENGINES / "body-threshold" / "model.onnx"
LIVER_BLOCK = (1, 1, 162, 162, 189)


def test_body_threshold_cost_is_its_closed_form() -> None:
    n, d, h, w = 2, 20, 30, 40
    v = n * d * h * w
    cost = model_cost(BODY, (n, 1, d, h, w))
    assert cost.input_shape == (n, 1, d, h, w)
    assert cost.conv_flops == 2 * 27 * v  # one 3×3×3 single-channel convolution
    assert cost.elementwise_flops == 6 * v  # Sub, Mul, Sigmoid, Sub, and Concat's two channels
    assert cost.flops == 60 * v
    assert cost.weight_bytes == cost.float_weight_bytes == (27 + 3) * 4
    assert cost.io_bytes == (1 + 2) * v * 4
    assert cost.activation_bytes == 5 * v * 4  # smoothed, centred, logit, p_body, p_background
    assert cost.peak_live_bytes == 2 * v * 4  # never more than one producer's input and output at a time
    assert cost.bytes_moved(4) == 120 + 12 * v + 2 * 20 * v
    assert cost.bytes_moved(2) == 60 + 12 * v + 2 * 10 * v
    assert cost.sample_bytes(4) == 12 * v + 8 * v and cost.sample_bytes(2) == 12 * v + 4 * v
    assert cost.arithmetic_intensity(2) == pytest.approx(60 * v / cost.bytes_moved(2))
    assert cost.arithmetic_intensity(4, include_elementwise=False) == pytest.approx(54 * v / cost.bytes_moved(4))


def _independent_liver_conv_macs(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(Conv MACs, Conv count) from the weights' shapes and output shapes propagated here by the
    operators' own formulas (no onnx.shape_inference): Conv/MaxPool output size, ReduceMean keepdims,
    broadcasting, Slice, and the Shape→Slice→Mul→Sub→Concat values that give Resize its sizes."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shape: dict[str, tuple[int, ...]] = {k: a.shape for k, a in init.items()}
    value: dict[str, np.ndarray] = {k: a for k, a in init.items() if a.dtype == np.int64}
    shape[model.graph.input[0].name] = input_shape
    macs = convs = 0
    for node in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        x, op, out = node.input[0], node.op_type, node.output[0]
        if op in ("Conv", "MaxPool"):
            k = a["kernel_shape"]
            pads = a.get("pads", [0] * 2 * len(k))
            strides = a.get("strides", [1] * len(k))
            spatial = tuple((i + pads[j] + pads[j + len(k)] - k[j]) // strides[j] + 1
                            for j, i in enumerate(shape[x][2:]))
            channels = init[node.input[1]].shape[0] if op == "Conv" else shape[x][1]
            shape[out] = (shape[x][0], channels, *spatial)
            if op == "Conv":
                weight = init[node.input[1]].shape  # (C_out, C_in, kd, kh, kw)
                macs += int(np.prod(shape[out])) * int(np.prod(weight[1:]))
                convs += 1
        elif op == "ReduceMean":
            shape[out] = tuple(1 if i in a["axes"] else s for i, s in enumerate(shape[x]))
        elif op in ("Sub", "Mul", "Add", "Div"):
            y = node.input[1]
            shape[out] = tuple(np.broadcast_shapes(shape[x], shape[y]))
            if x in value and y in value:
                value[out] = {"Sub": np.subtract, "Mul": np.multiply, "Add": np.add, "Div": np.floor_divide}[op](
                    value[x], value[y])
        elif op in ("Sqrt", "LeakyRelu", "Sigmoid"):
            shape[out] = shape[x]
        elif op == "Shape":
            value[out] = np.array(shape[x], dtype=np.int64)
            shape[out] = (len(shape[x]),)
        elif op == "Slice":
            starts, ends = value[node.input[1]], value[node.input[2]]
            if x in value:
                value[out] = value[x][int(starts[0]):int(ends[0])]
                shape[out] = value[out].shape
            else:
                axes = value[node.input[3]]
                dims = list(shape[x])
                for ax, s, e in zip(axes, starts, ends, strict=False):
                    dims[ax] = len(range(dims[ax])[int(s):int(e)])
                shape[out] = tuple(dims)
        elif op == "Concat":
            value[out] = np.concatenate([value[i] for i in node.input])
            shape[out] = value[out].shape
        elif op == "Resize":
            shape[out] = tuple(int(s) for s in value[node.input[3]])
        else:
            raise AssertionError(f"the independent count does not know {op}")
    return macs, convs


def test_liver_conv_flops_agree_with_an_independent_count() -> None:
    started = time.perf_counter()
    cost = model_cost(LIVER, LIVER_BLOCK)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"model_cost took {elapsed:.2f} s on the liver"
    model = onnx.load(str(LIVER))
    macs, convs = _independent_liver_conv_macs(model, LIVER_BLOCK)
    assert convs == 18
    assert cost.conv_flops == 2 * macs
    # The figures for one 162×162×189 block (rounded here; exact above): 925.5 GFLOP of convolutions,
    # 4.0 GFLOP elementwise, 3 874 961 parameters (15.5 MB), 1.76 GB peak live activations.
    assert 925e9 < cost.conv_flops < 926e9
    assert 3.9e9 < cost.elementwise_flops < 4.1e9
    params = sum(numpy_helper.to_array(t).size for t in model.graph.initializer if "/" in t.name)  # kernels, biases
    assert params == 3_874_961
    assert cost.float_weight_bytes == 4 * (params + 1)  # and the normalisation's epsilon
    assert cost.weight_bytes == sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert cost.io_bytes == 4 * (162 * 162 * 189 + 136 * 136 * 163)
    # The liveness walk: at least the largest layer's input and output (20 channels in, 40 out at
    # full resolution), never more than every intermediate at once.
    full = 162 * 162 * 189 * 4
    assert (20 + 40) * full <= cost.peak_live_bytes < cost.activation_bytes
    assert 1.7e9 < cost.peak_live_bytes < 1.8e9
    assert 13e9 < cost.activation_bytes < 14e9
    assert cost.nodes == len(model.graph.node)
    assert "925.5 GFLOP" in cost.summary()


@pytest.mark.parametrize("path, shape", [(LIVER, LIVER_BLOCK), (BODY, (1, 1, 24, 40, 36))], ids=["liver", "body"])
def test_cost_is_linear_in_the_batch(path: Path, shape: tuple[int, ...]) -> None:
    one = model_cost(path, shape)
    three = model_cost(path, (3, *shape[1:]))
    assert three.weight_bytes == one.weight_bytes
    for field in ("flops", "elementwise_flops", "activation_bytes", "io_bytes", "peak_live_bytes"):
        assert getattr(three, field) == 3 * getattr(one, field), field
    assert three.bytes_moved(2) - one.bytes_moved(2) == pytest.approx(2 * (one.bytes_moved(2) - one.weight_bytes / 2))


def test_the_liver_needs_its_block_dimensions_to_be_consistent() -> None:
    # Another block size of multiples of 27 works and costs less; the skip connections' crops need it.
    small = model_cost(LIVER, (1, 1, 81, 81, 108))
    big = model_cost(LIVER, LIVER_BLOCK)
    assert isinstance(small, ModelCost) and small.flops < big.flops / 4


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_errors_are_sentences_that_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"input 'image' has 5 dimensions, not the 4 of the shape"):
        model_cost(LIVER, (1, 162, 162, 189))
    with pytest.raises(BundleError, match=r"fixed size 1 on axis 1, not the 2 of the shape"):
        model_cost(LIVER, (1, 2, 162, 162, 189))
    with pytest.raises(BundleError, match=r"has a dimension that is not positive"):
        model_cost(BODY, (1, 1, 0, 8, 8))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BundleError, match=r"bad.onnx cannot be read as an ONNX model"):
        model_cost(bad, (1, 1, 8, 8, 8))
    # A data-dependent shape (NonZero) cannot be inferred: the error names the tensor.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("NonZero", ["x"], ["where"]),
             helper.make_node("Cast", ["where"], ["y"], to=TensorProto.FLOAT)]
    path = tmp_path / "nonzero.onnx"
    onnx.save(_model(nodes, [x], [y]), str(path))
    with pytest.raises(BundleError,
                       match=r"the shape of tensor 'where' in [^ ]*/nonzero.onnx cannot be inferred .*\(2 tensor"):
        model_cost(path, (2, 4))
    # Shapes that cannot broadcast fail ONNX shape inference itself.
    b = numpy_helper.from_array(np.ones((3,), np.float32), "b")
    path = tmp_path / "add.onnx"
    onnx.save(_model([helper.make_node("Add", ["x", "b"], ["y"])], [x], [y], [b]), str(path))
    with pytest.raises(BundleError, match=r"^shape inference fails on [^ ]*/add.onnx: "):
        model_cost(path, (2, 4))
