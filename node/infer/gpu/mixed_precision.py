"""Mixed precision written into the ONNX graph, for TensorRT's strongly typed networks.

TensorRT 11 builds every network strongly typed (the FP16/BF16 builder flags are gone): each layer
runs in the type its ONNX tensors have. :func:`to_mixed_precision` therefore rewrites a float32
model so that the heavy operators (Conv, ConvTranspose, MatMul, Gemm) and the cheap ones around
them compute in float16 or bfloat16, while the numerically delicate ones stay float32 with Casts
around them. Pure ``onnx`` + NumPy; nothing here touches a GPU.

The decisions, node by node in graph order, from each operator's ONNX schema:

- A node is *floating-point* when an output's type parameter is bound to float32 and (per the
  schema at the model's opset) also admits the low type; its *data* inputs are those with the same
  type parameter. Other inputs keep their type (Resize's roi, BatchNormalization's statistics and
  scale at opset ≥ 15), as do nodes with no float32 output (Shape, integer shape arithmetic), which
  take whichever version of their inputs exists.
- ``keep_fp32`` ops run in float32; so does ``Mul(x, x)`` when ``"Pow"`` is kept (a square is a power).
- Conv, ConvTranspose, MatMul and Gemm always run in the low type.
- Every other floating-point op runs in the low type, except that one whose data inputs all come
  from float32 nodes (or are constants) stays float32 (e.g. ``Sqrt(var) + eps``, or what follows a
  final Sigmoid): no cast down and back up for cheap arithmetic between float32 ops.
- Graph inputs and outputs stay float32: a Cast after each input that a low op reads and before each
  output that a low op writes. Casts are made once per tensor and type and always from the tensor as
  produced, so no Cast feeds a Cast; a widening Cast of the model's own (fp16 → float32) is read
  through rather than cast back, and is dropped when nothing else reads it.
- float32 initializers read by low ops are converted (a copy when float32 ops read them too): fp16
  with a range check (a finite weight beyond ±65504 raises BundleError naming it), bf16 by
  round-to-nearest-even on the float32 bits.
- bf16 needs opset 22 (Conv and MaxPool accept bfloat16 from there); older models are converted
  with ``onnx.version_converter`` first.

``simulate=True`` makes the same decisions but keeps every tensor float32, rounding through the low
type (Cast to it and back) wherever the real graph would hold a low tensor: the inputs of low ops,
their outputs and their weights (rounded in the initializer); outputs of ``EXACT_OPS`` (MaxPool,
Slice, Concat…), which only move values that are already rounded, are not rounded again. A float32
engine then computes each low op on low-precision inputs and weights with float32 accumulation and
rounds its output, which is how tensor cores run it, so ONNX Runtime's CPU provider can measure the
accuracy of a TensorRT fp16/bf16 engine on a machine without a GPU. (Not modelled: a kernel that
accumulates in fp16, or flushes subnormals to zero.)

The decisions are by operator, not by data: an activation that exceeds ±65504 in an fp16 op becomes
infinite. Check a model's outputs for non-finite values with :func:`precision_agreement` on real input
(the liver U-Net has none).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, defs, helper, numpy_helper, shape_inference

from node.errors import BundleError

LowPrecision = Literal["fp16", "bf16"]

#: Operators kept in float32, and why:
#: - normalisations compute their statistics at run time: a sum of squares over a whole instance or
#:   layer overflows fp16 (65504) and sums of many terms lose their small addends (fp16 has an 11-bit
#:   significand: past 2048 equal terms, one more no longer changes the sum; bf16 has 8 bits);
#: - reductions that add (ReduceMean/Sum/L1/L2/LogSum…, CumSum, global average pooling), for the same
#:   reason (ReduceMax/Min are exact in any precision and not listed);
#: - exponentials, logarithms and powers: Exp overflows fp16 above x ≈ 11.1, Pow/squares above
#:   |x| ≈ 256, Reciprocal below |x| ≈ 1.5e-5; Log(1 + ε) is 0 for ε below fp16's 2^-11; Sqrt is
#:   usually fed a variance from a float32 reduction, whose small values (< 6.1e-5) would be fp16
#:   subnormals; Softmax/LogSoftmax and Softplus contain an exponential and a sum;
#: - Sigmoid: the final probabilities that are thresholded (a few cheap elementwise ops).
#: BatchNormalization is not here: at inference it is a per-channel affine with stored statistics
#: (no run-time reduction) that TensorRT folds into the convolution before it; from opset 15 its
#: scale and statistics keep their float32 type anyway (they have their own type parameters).
KEEP_FP32_OPS: frozenset[str] = frozenset({
    "InstanceNormalization", "LayerNormalization", "GroupNormalization", "MeanVarianceNormalization",
    "LpNormalization", "RMSNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "CumSum", "GlobalAveragePool", "GlobalLpPool",
    "Softmax", "LogSoftmax", "Softplus", "Sigmoid", "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
})

#: Operators that always compute in the low type: the multiply-accumulate work tensor cores do.
LOW_PRECISION_OPS: frozenset[str] = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})

#: Operators whose output holds only values of their inputs (data movement, selection, sign): on
#: inputs already rounded to the low type their output needs no rounding (simulate skips it).
EXACT_OPS: frozenset[str] = frozenset({
    "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "Max", "Min", "Relu", "Neg", "Abs", "Identity",
    "Slice", "Concat", "Split", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Tile",
    "Gather", "GatherElements", "GatherND", "DepthToSpace", "SpaceToDepth", "Where",
})

FP16_MAX = 65504.0
BF16_MIN_OPSET = 22
_LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_FLOAT = TensorProto.FLOAT
#: Casts that lose nothing: casting their output back to the source type gives the source exactly.
_WIDENING = frozenset({(TensorProto.FLOAT16, _FLOAT), (TensorProto.BFLOAT16, _FLOAT), (_FLOAT, TensorProto.DOUBLE),
                       (TensorProto.FLOAT16, TensorProto.DOUBLE), (TensorProto.BFLOAT16, TensorProto.DOUBLE)})


def _type_str(elem_type: int) -> str:
    return f"tensor({helper.tensor_dtype_to_string(elem_type).removeprefix('TensorProto.').lower()})"


def _label(elem_type: int) -> str:
    """fp32, fp16, bf16 or the ONNX type's own name, for the names of new tensors."""
    short: dict[int, str] = {_FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
    return short.get(elem_type) or helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()


# ---------------------------------------------------------------------------------------- weights


def float32_to_bf16_bits(values: npt.ArrayLike) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``values``, rounded to nearest, ties to even; NaNs
    stay (quiet) NaNs with their sign, infinities stay infinite."""
    f32 = np.ascontiguousarray(values, dtype="<f4")
    bits = f32.view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def bf16_bits_to_float32(bits: npt.ArrayLike) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype("<u4") << 16).view("<f4")


def round_to(values: npt.ArrayLike, low: LowPrecision) -> np.ndarray:
    """float32 ``values`` rounded to the nearest ``low`` value (fp16 or bf16), as float32."""
    f32 = np.asarray(values, dtype=np.float32)
    if low == "fp16":
        with np.errstate(over="ignore"):
            return f32.astype(np.float16).astype(np.float32)
    return bf16_bits_to_float32(float32_to_bf16_bits(f32)).reshape(f32.shape)


def _converted_weight(tensor: onnx.TensorProto, low: LowPrecision, new_name: str, simulate: bool) -> onnx.TensorProto:
    """``tensor`` (float32) in the low type, or rounded through it and kept float32 (``simulate``)."""
    values = numpy_helper.to_array(tensor).astype(np.float32, copy=False)
    rounded = round_to(values, low)
    overflow = np.isinf(rounded) & np.isfinite(values)
    if overflow.any():
        worst = float(np.abs(values[overflow]).max())
        limit = f"±{FP16_MAX:g}" if low == "fp16" else "±3.39e38"
        raise BundleError(f"weight {tensor.name!r} holds {worst:g}, beyond the {low} range ({limit}); "
                          f"run its consumers in float32 (keep_fp32) or use "
                          f"{'bf16' if low == 'fp16' else 'float32'}")
    if simulate:
        return numpy_helper.from_array(rounded, new_name)
    if low == "fp16":
        return numpy_helper.from_array(values.astype(np.float16), new_name)
    out = onnx.TensorProto(name=new_name, data_type=TensorProto.BFLOAT16, dims=list(values.shape))
    out.raw_data = float32_to_bf16_bits(values).tobytes()
    return out


# ---------------------------------------------------------------------------------------- graph


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the main graph, from ONNX type inference."""
    try:
        inferred = shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # onnx raises InferenceError, ValidationError, RuntimeError
        raise BundleError(f"type inference fails on the model: {exc}") from exc
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = attr.t.data_type
        for name in node.output:
            if name and name not in types:
                raise BundleError(f"the type of tensor {name!r} (output of {node.op_type} node {node.name!r}) "
                                  "cannot be inferred; mixed precision needs every tensor's type")
    return types


def _opset(model: onnx.ModelProto, domain: str = "") -> int:
    for entry in model.opset_import:
        if (entry.domain in ("", "ai.onnx") and domain in ("", "ai.onnx")) or entry.domain == domain:
            return int(entry.version)
    return 0


def _formal(params: list[defs.OpSchema.FormalParameter], index: int) -> str | None:
    """The type string of actual argument ``index`` against the schema's formal parameters."""
    if index < len(params):
        return str(params[index].type_str)
    if params and params[-1].option == defs.OpSchema.FormalParameterOption.Variadic:
        return str(params[-1].type_str)
    return None


def _without_dead_nodes(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less those whose outputs nothing reads (a Cast of the model's own that the rewrite
    reads through), walking backwards so that chains go too."""
    needed = set(graph_outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
    return kept[::-1]


class _Rewriter:
    """One pass over the graph in order, emitting the new node list (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, low: LowPrecision, keep_fp32: frozenset[str], simulate: bool) -> None:
        self.model = model
        self.graph = model.graph
        self.low_name: LowPrecision = low
        self.low = _LOW_TYPES[low]
        self.low_str = _type_str(self.low)
        self.keep = keep_fp32
        self.simulate = simulate
        self.types = _tensor_types(model)
        self.opset = _opset(model)
        graph = self.graph
        input_names = {i.name for i in graph.input}
        # Initializers that are also graph inputs can be overridden at run time: cast, never convert.
        self.initializers = {t.name: t for t in graph.initializer if t.name not in input_names}
        self.constants = set(self.initializers) | {n.output[0] for n in graph.node if n.op_type == "Constant"}
        self.graph_outputs = {o.name for o in graph.output}
        self.used = {n for node in graph.node for n in [*node.input, *node.output, node.name] if n}
        self.used |= input_names | set(self.initializers) | self.graph_outputs
        # name → {logical element type: tensor that holds it}; name → type as produced
        self.avail: dict[str, dict[int, str]] = {}
        self.native: dict[str, int] = {}
        for name in [*input_names, *(t.name for t in graph.initializer)]:
            self.avail[name] = {self.types[name]: name}
            self.native[name] = self.types[name]
        self.fp32_region: set[str] = set()
        self.cast_of: dict[str, str] = {}  # output of one of the model's own Casts → its input
        self.nodes: list[onnx.NodeProto] = []
        self.new_initializers: list[onnx.TensorProto] = []
        self.counts = {"low": 0, "fp32": 0}
        self.kept_ops: set[str] = set()

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def cast(self, source: str, target: str, to: int) -> None:
        self.nodes.append(helper.make_node("Cast", [source], [target], to=to,
                                           name=self.fresh(f"cast_{_label(to)}:{target}")))

    def round_trip(self, source: str, target: str, middle: str) -> None:
        """``target`` = ``source`` rounded through the low type, via ``middle`` (simulate)."""
        middle = self.fresh(middle)
        self.cast(source, middle, self.low)
        self.cast(middle, target, _FLOAT)

    def get(self, name: str, want: int) -> str:
        """The tensor that holds ``name`` as element type ``want``, made on first request."""
        versions = self.avail[name]
        if want in versions:
            return versions[want]
        source = self.cast_of.get(name)
        if source is not None and self.native.get(source) == want:  # a widening Cast(x) back to x's own type is x
            # (when simulating, the float32 tensor the model widened holds exactly x's values)
            versions[want] = versions[self.native[name]] if self.simulate else self.get(source, want)
            return versions[want]
        if name in self.initializers and self.native[name] == _FLOAT and want == self.low:
            tensor = _converted_weight(self.initializers[name], self.low_name, self.fresh(f"{name}/{self.low_name}"),
                                       self.simulate)
            self.new_initializers.append(tensor)
            versions[want] = tensor.name
            return tensor.name
        produced = versions[self.native[name]]
        target = self.fresh(f"{name}/{_label(want)}")
        if self.simulate and want == self.low:
            self.round_trip(produced, target, f"{target}/cast")
        else:
            self.cast(produced, target, want)
        versions[want] = target
        return target

    def rewrite(self) -> None:
        for node in self.graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise BundleError(f"node {node.name or node.op_type!r} ({node.op_type}) has a subgraph; "
                                  "mixed precision handles straight-line graphs only")
            self.rewrite_node(node)

    def rewrite_node(self, original: onnx.NodeProto) -> None:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        try:
            schema = defs.get_schema(node.op_type, self.opset if node.domain in ("", "ai.onnx") else
                                     _opset(self.model, node.domain), node.domain)
        except Exception:  # an operator onnx does not know (a custom domain): leave it as it is
            schema = None
        ins = [(_formal(list(schema.inputs), i) if schema else None) for i in range(len(node.input))]
        outs = [(_formal(list(schema.outputs), i) if schema else None) for i in range(len(node.output))]
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints} if schema else {}
        bound: dict[str, set[int]] = {}
        for name, param in [*zip(node.input, ins, strict=True), *zip(node.output, outs, strict=True)]:
            if name and param in allowed:
                bound.setdefault(param, set()).add(self.types[name])
        data = {p for p in outs if p in allowed and bound.get(p) == {_FLOAT}}

        precision: int | None = None  # None: not a floating-point node
        if data:
            square = node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]
            fits = all(self.low_str in allowed[p] for p in data)
            activations = [n for n, p in zip(node.input, ins, strict=True)
                           if n and p in data and n not in self.constants]
            if node.op_type in self.keep or (square and "Pow" in self.keep) or not fits:
                precision = _FLOAT
                self.kept_ops.add("Pow (x*x)" if square and node.op_type not in self.keep else node.op_type)
            elif node.op_type in LOW_PRECISION_OPS:
                precision = self.low
            elif all(n in self.fp32_region for n in activations):
                precision = _FLOAT
            else:
                precision = self.low
            self.counts["low" if precision == self.low else "fp32"] += 1

        for i, (name, param) in enumerate(zip(node.input, ins, strict=True)):
            if not name:
                continue
            if precision is not None and param in data:
                want = precision
            else:  # keeps its type, or takes whichever version exists when the op allows it and all agree
                want = self.types[name]
                if param in allowed:
                    natives = {self.native[n] for n, p in zip(node.input, ins, strict=True) if n and p == param}
                    native = self.native[name]
                    if len(natives) == 1 and _type_str(native) in allowed[param] and native != TensorProto.UNDEFINED:
                        want = native
            node.input[i] = self.get(name, want)

        after: list[tuple[str, str]] = []  # (produced, graph output) casts/round trips to emit after the node
        for i, (name, param) in enumerate(zip(node.output, outs, strict=True)):
            if not name:
                continue
            if precision == self.low and param in data:
                self.native[name] = self.low
                if self.simulate and node.op_type in EXACT_OPS:
                    self.avail[name] = {self.low: name, _FLOAT: name}
                elif self.simulate:
                    raw = self.fresh(f"{name}/unrounded")
                    node.output[i] = raw
                    after.append((raw, name))
                    self.avail[name] = {self.low: name, _FLOAT: name}
                elif name in self.graph_outputs:
                    produced = self.fresh(f"{name}/{self.low_name}")
                    node.output[i] = produced
                    after.append((produced, name))
                    self.avail[name] = {self.low: produced, _FLOAT: name}
                else:
                    self.avail[name] = {self.low: name}
            else:
                self.native[name] = self.types[name]
                self.avail[name] = {self.types[name]: name}
                if precision == _FLOAT and param in data and node.op_type != "Constant":
                    self.fp32_region.add(name)
        if node.op_type == "Cast" and (self.types[original.input[0]], self.types[original.output[0]]) in _WIDENING:
            self.cast_of[node.output[0]] = original.input[0]
        self.nodes.append(node)
        for produced, name in after:
            if self.simulate:
                self.round_trip(produced, name, f"{name}/{self.low_name}")
            else:
                self.cast(produced, name, _FLOAT)

    def finish(self) -> onnx.ModelProto:
        graph = self.graph
        del graph.node[:]
        graph.node.extend(_without_dead_nodes(self.nodes, self.graph_outputs))
        referenced = {n for node in graph.node for n in node.input} | self.graph_outputs | {i.name for i in graph.input}
        kept = [t for t in graph.initializer if t.name in referenced]
        del graph.initializer[:]
        graph.initializer.extend([*kept, *self.new_initializers])
        del graph.value_info[:]  # stale types; inference recomputes them
        kind = f"{self.low_name} simulated in float32" if self.simulate else self.low_name
        summary = (f"{kind}: {self.counts['low']} floating-point nodes in {self.low_name}, "
                   f"{self.counts['fp32']} in float32 "
                   f"(kept: {', '.join(sorted(self.kept_ops)) or 'none'})")
        props = [p for p in self.model.metadata_props if p.key != "node.mixed_precision"]
        del self.model.metadata_props[:]
        self.model.metadata_props.extend(props)
        self.model.metadata_props.add(key="node.mixed_precision", value=summary)
        return self.model


def to_mixed_precision(model: onnx.ModelProto, low: LowPrecision, *, keep_fp32: frozenset[str] = KEEP_FP32_OPS,
                       simulate: bool = False) -> onnx.ModelProto:
    """A copy of the float32 ``model`` computing in ``low`` ("fp16" or "bf16") where it is safe, with
    float32 inputs and outputs (see the module docstring); ``simulate`` keeps every tensor float32 and
    rounds through ``low`` instead. ``model`` itself is not changed. Raises BundleError for a weight
    beyond the fp16 range, a tensor whose type cannot be inferred, a graph with subgraphs (If, Loop,
    Scan), or a result that fails ``onnx.checker``."""
    if low not in _LOW_TYPES:
        raise ValueError(f"low precision {low!r} is neither 'fp16' nor 'bf16'")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if low == "bf16" and _opset(copy) < BF16_MIN_OPSET:
        from onnx import version_converter

        try:
            copy = version_converter.convert_version(copy, BF16_MIN_OPSET)
        except Exception as exc:
            raise BundleError(f"the model's opset {_opset(copy)} cannot be converted to opset {BF16_MIN_OPSET}, "
                              f"the first in which Conv accepts bfloat16: {exc}") from exc
        copy.ir_version = max(copy.ir_version, helper.find_min_ir_version_for(list(copy.opset_import), True))
    rewriter = _Rewriter(copy, low, frozenset(keep_fp32), simulate)
    rewriter.rewrite()
    result = rewriter.finish()
    try:
        onnx.checker.check_model(result, full_check=True)
    except Exception as exc:
        raise BundleError(f"the {low} version of the model fails the ONNX checker: {exc}") from exc
    return result


# ---------------------------------------------------------------------------------------- accuracy


def precision_agreement(fp32_out: npt.ArrayLike, low_out: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """How far a reduced-precision output is from the float32 one: ``max_abs_diff``,
    ``mean_abs_diff`` and ``p99_abs_diff`` over all elements, ``dice`` of the masks ``> threshold``
    (1.0 when both are empty), ``changed`` (elements whose mask differs), ``mask_voxels`` (of the
    float32 mask) and ``nonfinite`` (NaN/inf elements in ``low_out``)."""
    a = np.asarray(fp32_out, dtype=np.float32)
    b = np.asarray(low_out, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"outputs of shapes {a.shape} and {b.shape} cannot be compared")
    nonfinite = int(np.count_nonzero(~np.isfinite(b)))
    diff = np.abs(b.astype(np.float64) - a.astype(np.float64))
    mask_a, mask_b = a > threshold, b > threshold
    both = int(np.count_nonzero(mask_a & mask_b))
    total = int(np.count_nonzero(mask_a)) + int(np.count_nonzero(mask_b))
    return {
        "max_abs_diff": float(np.nanmax(diff)) if diff.size else 0.0,
        "mean_abs_diff": float(np.nanmean(diff)) if diff.size else 0.0,
        "p99_abs_diff": float(np.nanpercentile(diff, 99)) if diff.size else 0.0,
        "dice": 2.0 * both / total if total else 1.0,
        "changed": float(np.count_nonzero(mask_a != mask_b)),
        "mask_voxels": float(np.count_nonzero(mask_a)),
        "nonfinite": float(nonfinite),
    }


def low_precision_nodes(model: onnx.ModelProto, low: LowPrecision) -> list[str]:
    """Names (or op types) of the nodes of a :func:`to_mixed_precision` result that compute in ``low``
    (their first output has that type), for reports and tests."""
    types = _tensor_types(model)
    wanted = _LOW_TYPES[low]
    return [n.name or n.op_type for n in model.graph.node
            if n.op_type != "Cast" and n.output and types.get(n.output[0]) == wanted]
