"""What one inference of an ONNX model costs: arithmetic, weights, activation traffic and memory.

For a roofline estimate (FLOPs against bytes moved) and for sizing a TensorRT batch from the GPU's
free memory (weights once, plus ``io_bytes + peak_live_bytes`` per sample). Pure ``onnx``: the shapes
of every tensor come from ONNX shape inference run on a copy of the model whose input dimensions are
set to the concrete shape analysed, with data propagation so that shapes computed inside the graph
(``Shape`` → ``Slice`` → ``Concat`` → ``Resize``) resolve.

Counting rules (one sample of the concrete shape, no operator fusion):

- ``Conv``, ``ConvTranspose``, ``MatMul``, ``Gemm``: 2 × multiply-accumulates (bias additions not
  counted): Conv 2·N·C_out·∏out_spatial·(C_in/group)·∏kernel; ConvTranspose
  2·N·C_in·∏in_spatial·(C_out/group)·∏kernel; MatMul 2·|output|·K; Gemm 2·M·N·K.
- every other operator: one operation per floating-point output element (``elementwise_flops``),
  except reductions (``Reduce*``, ``GlobalAveragePool``/``GlobalMaxPool``), which do one per *input*
  element, and pooling, which does one per output element per kernel tap. Integer outputs (shape
  arithmetic: ``Shape`` → ``Slice`` → ``Concat``) are neither work nor activation memory.
- ``flops`` is the total of both; ``conv_flops`` the tensor-core part alone.

Every figure but the weights is proportional to the batch N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper, shape_inference

from node.errors import BundleError

#: Operators counted by multiply-accumulates (the ones tensor cores run).
MAC_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceMax",
                         "ReduceMin", "ReduceProd", "ReduceLogSum", "ReduceLogSumExp", "GlobalAveragePool",
                         "GlobalMaxPool", "GlobalLpPool"})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


@dataclass(frozen=True)
class ModelCost:
    """The cost of one inference on an input of ``input_shape`` (see the module docstring)."""

    input_shape: tuple[int, ...]   # concrete shape analysed
    flops: float                   # conv_flops + elementwise_flops
    elementwise_flops: float       # every operator but Conv/ConvTranspose/MatMul/Gemm
    weight_bytes: int              # initializers and Constant nodes, at their stored dtype
    activation_bytes: int          # every floating-point intermediate once, as fp32: traffic if no op were fused
    io_bytes: int                  # graph inputs + outputs, at their dtype
    peak_live_bytes: int           # peak of simultaneously live intermediates (see model_cost)
    float_weight_bytes: int        # the floating-point part of weight_bytes (what a precision change resizes)
    nodes: int                     # nodes in the graph

    @property
    def conv_flops(self) -> float:
        """2 × MACs of Conv, ConvTranspose, MatMul and Gemm."""
        return self.flops - self.elementwise_flops

    def bytes_moved(self, element_size: int = 4) -> float:
        """Estimated DRAM traffic of one inference with activations (and float weights) stored at
        ``element_size`` bytes (4 fp32, 2 fp16/bf16).

        Model: weights read once; graph inputs and outputs read/written once at their own dtype (the
        engines keep float32 I/O); every intermediate tensor written once by its producer and read
        back once (2 × ``activation_bytes`` at that element size). No fusion and no cache reuse: an
        upper estimate for an unfused engine; TensorRT's fusions (conv + bias + activation,
        normalisations) remove much of the intermediate traffic.
        """
        scale = element_size / 4.0
        weights = (self.weight_bytes - self.float_weight_bytes) + self.float_weight_bytes * scale
        return weights + self.io_bytes + 2.0 * self.activation_bytes * scale

    def sample_bytes(self, element_size: int = 4) -> float:
        """Memory one more sample of a batch needs: its input and output (at their dtype) and the peak
        of live intermediates at ``element_size`` bytes per element (weights are shared, not included).
        An estimate: an engine's own memory planning and fusions change the real figure."""
        return self.io_bytes + self.peak_live_bytes * element_size / 4.0

    def arithmetic_intensity(self, element_size: int = 4, *, include_elementwise: bool = True) -> float:
        """FLOPs per byte of :meth:`bytes_moved` (all FLOPs, or only the conv/matmul ones)."""
        work = self.flops if include_elementwise else self.conv_flops
        return work / self.bytes_moved(element_size)

    def summary(self) -> str:
        """One line of the figures, for logs and ``engines bench``."""
        return (f"input {self.input_shape}: {self.conv_flops / 1e9:.1f} GFLOP conv/matmul + "
                f"{self.elementwise_flops / 1e9:.2f} GFLOP elementwise, weights {self.weight_bytes / 1e6:.1f} MB, "
                f"activations {self.activation_bytes / 1e6:.0f} MB (fp32, unfused), "
                f"peak live {self.peak_live_bytes / 1e6:.0f} MB, I/O {self.io_bytes / 1e6:.1f} MB")


def _itemsize(elem_type: int) -> int:
    if elem_type == TensorProto.STRING:
        return 8  # a pointer per element; never in the models this is for
    return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize)


def _numel(dims: list[int] | tuple[int, ...]) -> int:
    return math.prod(dims) if dims else 1


def _concrete_copy(model: onnx.ModelProto, input_shape: tuple[int, ...], path: Path) -> onnx.ModelProto:
    """A copy of ``model`` with its one real input set to ``input_shape`` and output shapes cleared."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    initializers = {t.name for t in copy.graph.initializer}
    inputs = [i for i in copy.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BundleError(f"{_label(path)} has {len(inputs)} inputs ({[i.name for i in inputs]}); "
                          "the cost analysis needs exactly one")
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != len(input_shape):
        raise BundleError(f"{_label(path)}: input {inputs[0].name!r} has {len(tensor_type.shape.dim)} dimensions, "
                          f"not the {len(input_shape)} of the shape {input_shape} asked for")
    for i, (dim, value) in enumerate(zip(tensor_type.shape.dim, input_shape, strict=False)):
        if dim.HasField("dim_value") and dim.dim_value != value:
            raise BundleError(f"{_label(path)}: input {inputs[0].name!r} has a fixed size {dim.dim_value} on axis {i}, "
                              f"not the {value} of the shape {input_shape} asked for")
    tensor_type.ClearField("shape")
    for value in input_shape:
        tensor_type.shape.dim.add().dim_value = value
    for output in copy.graph.output:  # symbolic output dims (D_out) would only be merged with, not replaced
        output.type.tensor_type.ClearField("shape")
    del copy.graph.value_info[:]
    return copy


def _shapes(model: onnx.ModelProto, path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name → (concrete shape, elem_type) of every tensor in the main graph."""
    try:
        inferred = shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError, ValidationError, RuntimeError
        raise BundleError(f"shape inference fails on {_label(path)}: {exc}") from exc
    found: dict[str, tuple[tuple[int, ...], int]] = {}
    for t in inferred.graph.initializer:
        found[t.name] = (tuple(t.dims), t.data_type)
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    found[node.output[0]] = (tuple(attr.t.dims), attr.t.data_type)
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        if not info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            found[info.name] = (tuple(int(d.dim_value) for d in dims), tensor_type.elem_type)
    missing = [name for node in inferred.graph.node for name in node.output if name and name not in found]
    missing += [o.name for o in inferred.graph.output if o.name not in found and o.name not in missing]
    if missing:
        raise BundleError(f"the shape of tensor {missing[0]!r} in {_label(path)} cannot be inferred for this "
                          f"input shape ({len(missing)} tensor(s) without a concrete shape); "
                          "the cost analysis needs every shape")
    return found


def _label(path: Path) -> str:
    """``liver/model.onnx``: the bundle folder and the file, for messages."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _node_flops(node: onnx.NodeProto, info: dict[str, tuple[tuple[int, ...], int]]) -> tuple[float, float]:
    """(MAC flops, elementwise flops) of one node."""
    op = node.op_type

    def shape(name: str) -> tuple[int, ...]:
        return info[name][0]

    outputs = [info[o][0] for o in node.output if o and info[o][1] in _FLOAT_TYPES]
    if not outputs:
        return 0.0, 0.0
    if op == "Conv":
        w, y = shape(node.input[1]), outputs[0]  # W (C_out, C_in/group, *k), Y (N, C_out, *spatial)
        return 2.0 * _numel(y) * _numel(w[1:]), 0.0
    if op == "ConvTranspose":
        x, w = shape(node.input[0]), shape(node.input[1])  # X (N, C_in, *spatial), W (C_in, C_out/group, *k)
        return 2.0 * _numel(x) * _numel(w[1:]), 0.0
    if op == "MatMul":
        a = shape(node.input[0])
        return 2.0 * _numel(outputs[0]) * a[-1], 0.0
    if op == "Gemm":
        a = shape(node.input[0])
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2.0 * _numel(outputs[0]) * k, 0.0
    if op in _REDUCTIONS and node.input:
        return 0.0, float(_numel(shape(node.input[0])))
    if op in _POOLS:
        kernel = _attr(node, "kernel_shape", [])
        assert isinstance(kernel, list)
        return 0.0, float(_numel(outputs[0]) * _numel(kernel))
    return 0.0, float(sum(_numel(o) for o in outputs))


def model_cost(model_path: Path, input_shape: tuple[int, ...]) -> ModelCost:
    """The cost of one inference of the ONNX model at ``model_path`` on an input of ``input_shape``.

    ``peak_live_bytes`` walks the nodes in the graph's (topological) order: an intermediate tensor is
    live from its producer until its last consumer, both included; the peak of the live total (as
    fp32) is the activation memory one sample needs, excluding weights and the graph's inputs and
    outputs (``io_bytes``), which an engine holds in its own buffers. Raises BundleError when the
    model cannot be read, is not one-input, or a tensor's shape cannot be inferred for this input.
    """
    path = Path(model_path)
    input_shape = tuple(int(v) for v in input_shape)
    if any(v <= 0 for v in input_shape):
        raise BundleError(f"input shape {input_shape} for {_label(path)} has a dimension that is not positive")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise BundleError(f"{path} cannot be read as an ONNX model: {exc}") from exc
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise BundleError(f"{_label(path)}: node {node.name or node.op_type!r} ({node.op_type}) has a subgraph; "
                              "the cost analysis handles straight-line graphs only")
    info = _shapes(_concrete_copy(model, input_shape, path), path)

    def nbytes(name: str) -> int:  # fp32 size of a float tensor
        return _numel(info[name][0]) * 4

    weights = [(tuple(t.dims), t.data_type) for t in graph.initializer]
    weights += [info[n.output[0]] for n in graph.node if n.op_type == "Constant" and n.output[0] in info]
    weight_bytes = sum(_numel(d) * _itemsize(e) for d, e in weights)
    float_weight_bytes = sum(_numel(d) * _itemsize(e) for d, e in weights if e in _FLOAT_TYPES)

    initializer_names = {t.name for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in initializer_names]
    graph_outputs = [o.name for o in graph.output]
    io_bytes = sum(_numel(info[n][0]) * _itemsize(info[n][1]) for n in [*graph_inputs, *graph_outputs])

    mac = elementwise = 0.0
    constants = {n.output[0] for n in graph.node if n.op_type == "Constant"}
    boundary = set(graph_inputs) | set(graph_outputs) | initializer_names | constants
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                last_use[name] = i
    activation_bytes = 0
    live = peak = 0
    dying: dict[int, list[str]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "Constant":
            m, e = _node_flops(node, info)
            mac, elementwise = mac + m, elementwise + e
        for name in node.output:
            if not name or name in boundary or info[name][1] not in _FLOAT_TYPES:
                continue
            size = nbytes(name)
            activation_bytes += size
            live += size
            dying.setdefault(last_use.get(name, i), []).append(name)  # an unused output dies at once
        peak = max(peak, live)
        for name in dying.pop(i, []):
            live -= nbytes(name)
    return ModelCost(input_shape=input_shape, flops=mac + elementwise, elementwise_flops=elementwise,
                     weight_bytes=weight_bytes, float_weight_bytes=float_weight_bytes,
                     activation_bytes=activation_bytes, io_bytes=io_bytes, peak_live_bytes=peak,
                     nodes=len(graph.node))
