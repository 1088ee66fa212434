"""Mixed precision in the ONNX graph (node/infer/gpu/mixed_precision.py): the rewritten graphs' structure
(checker, types, casts, weights) for both shipped models in fp16 and bf16, real and simulated; the
rounding against ONNX Runtime's own Casts and ml_dtypes; and accuracy, simulated on the CPU, of the
body-threshold network on a phantom and of the liver U-Net on a real CT block.

ONNX Runtime's CPU provider runs a real fp16 graph, but not in fp16: it has no fp16 Conv (or
LeakyRelu, Resize…) kernels on x86, so it inserts Casts to float32 around those nodes and then
removes the Cast pairs it made redundant: most of the graph runs in float32 (the liver's fp16 graph
keeps 12 of its 70 Casts and differs from float32 by 0.001 at most, a third of what the simulation
shows). It has no bf16 Conv at all. Accuracy is therefore measured on ``simulate=True`` graphs; the
real fp16 graph is run only on the small body-threshold network, where it agrees with the simulation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from node.errors import BundleError
from node.infer.gpu.mixed_precision import (
    KEEP_FP32_OPS,
    LOW_PRECISION_OPS,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    low_precision_nodes,
    precision_agreement,
    round_to,
    to_mixed_precision,
)

ENGINES = Path(__file__).resolve().parents[2] / "engines"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
MODELS = {"liver": ENGINES / "liver" / "model.onnx", "body": ENGINES / "body-threshold" / "model.onnx"}
LOW = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}


@pytest.fixture(scope="module")
def originals() -> dict[str, onnx.ModelProto]:
    return {name: onnx.load(str(path)) for name, path in MODELS.items()}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        types[info.name] = info.type.tensor_type.elem_type
    return types


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = False
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, image: np.ndarray) -> np.ndarray:
    (out,) = _session(model).run(["probabilities"], {"image": image})
    return np.asarray(out)


# ------------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("simulate", [False, True], ids=["real", "simulate"])
@pytest.mark.parametrize("low", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["liver", "body"])
def test_rewritten_graph_is_valid_and_typed_as_intended(originals: dict[str, onnx.ModelProto], name: str, low: str,
                                                        simulate: bool) -> None:
    original = originals[name]
    before = original.SerializeToString()
    model = to_mixed_precision(original, low, simulate=simulate)  # type: ignore[arg-type]
    assert original.SerializeToString() == before, "the input model was changed"
    onnx.checker.check_model(model, full_check=True)
    types = _types(model)  # strict type inference agrees with every declared type (or raises)
    g = model.graph
    for new, old in [(g.input, original.graph.input), (g.output, original.graph.output)]:
        assert [(v.name, v.type.tensor_type.elem_type) for v in new] == [(v.name, TensorProto.FLOAT) for v in old]
    producer = {out: node for node in g.node for out in node.output}
    inits = {t.name: t for t in g.initializer}
    low_type = LOW[low]
    casts = [n for n in g.node if n.op_type == "Cast"]
    to = {n.output[0]: helper.get_attribute_value(n.attribute[0]) for n in casts}

    convs = [n for n in g.node if n.op_type in LOW_PRECISION_OPS]
    kept = [n for n in g.node if n.op_type in KEEP_FP32_OPS or (n.op_type == "Mul" and n.input[0] == n.input[1])]
    assert len(convs) == {"liver": 18, "body": 1}[name]
    assert len(kept) == {"liver": 137, "body": 1}[name]  # 102 ReduceMean, 17 Sqrt, 17 squares, 1 Sigmoid
    for node in kept:  # float32 in and out, in both modes
        assert all(types[t] == TensorProto.FLOAT for t in [*node.input, *node.output]
                   if t and types[t] in FLOATS), node.name

    if not simulate:
        for node in convs:  # data, weights, bias and output all in the low type
            assert all(types[t] == low_type for t in [*node.input, *node.output] if t), node.name
            assert all(t in inits or t in producer for t in node.input if t)
        for cast in casts:  # never Cast → Cast, never a cast to the type a tensor already has
            assert producer.get(cast.input[0]) is None or producer[cast.input[0]].op_type != "Cast", cast.name
            assert types[cast.input[0]] != to[cast.output[0]], cast.name
        # every float32 initializer left is read by a float32 op (no stale copies)
        readers = {t: [n for n in g.node if t in n.input] for t in inits}
        assert all(readers[t] for t in inits)
        assert {TensorProto.FLOAT, low_type} >= {t.data_type for t in g.initializer} - {TensorProto.INT64}
        assert len(casts) == {"liver": 70, "body": 2}[name]
        assert len(low_precision_nodes(model, low)) == {"liver": 81, "body": 3}[name]  # type: ignore[arg-type]
    else:
        cast_middles = {n.output[0] for n in casts if to[n.output[0]] == low_type}
        assert {t for name, t in types.items() if t in FLOATS and name not in cast_middles} == {TensorProto.FLOAT}
        assert all(types[t] == low_type for t in cast_middles)
        for cast in casts:  # only round trips: (→ low, → float32), and nothing rounded twice
            if to[cast.output[0]] == TensorProto.FLOAT:
                assert producer[cast.input[0]].op_type == "Cast" and to[cast.input[0]] == low_type, cast.name
            else:
                before_cast = producer.get(cast.input[0])
                assert before_cast is None or before_cast.op_type != "Cast", cast.name
        for node in convs:  # activations rounded by a round trip, weights rounded in place
            x = node.input[0]
            assert producer[x].op_type == "Cast" and to[producer[x].input[0]] == low_type, node.name
            for w in node.input[1:]:
                values = numpy_helper.to_array(inits[w])
                assert np.array_equal(values, round_to(values, low)), w  # type: ignore[arg-type]
    real = to_mixed_precision(original, low) if simulate else model  # type: ignore[arg-type]
    summary = {p.key: p.value for p in model.metadata_props}["node.mixed_precision"]
    real_summary = {p.key: p.value for p in real.metadata_props}["node.mixed_precision"]
    assert summary.split(":", 1)[1] == real_summary.split(":", 1)[1], "simulate made other decisions"


def _tiny(nodes: list[onnx.NodeProto], outputs: list[str], initializers: list[onnx.TensorProto],
          opset: int = 17) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 2, 4, 4]) for o in outputs]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], outs, initializers),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _weight(name: str, value: float, shape: tuple[int, ...] = (2, 2, 1, 1)) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full(shape, value, np.float32), name)


def test_boundaries_shared_weights_batch_norm_and_the_models_own_casts() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"]),            # low, and a graph output
        helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("Softmax", ["bn"], ["soft"], axis=1),      # kept
        helper.make_node("Mul", ["soft", "w"], ["scaled"]),         # follows float32; shares w with the Conv
        helper.make_node("Cast", ["scaled"], ["as_double"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["as_double"], ["back"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["back"], ["relu"]),
        helper.make_node("Add", ["relu", "conv"], ["out"]),         # mixed inputs: low
    ]
    inits = [_weight("w", 0.5), *(numpy_helper.from_array(np.full(2, v, np.float32), n)
                                  for n, v in [("scale", 2.0), ("bias", 0.1), ("mean", 0.3), ("var", 1e-6)])]
    model = to_mixed_precision(_tiny(nodes, ["conv", "out"], inits), "fp16")
    types = _types(model)
    g = model.graph
    by_output = {n.output[0]: n for n in g.node}
    assert types["conv"] == TensorProto.FLOAT and by_output["conv"].op_type == "Cast"  # graph output stays float32
    conv = next(n for n in g.node if n.op_type == "Conv")
    assert types[conv.output[0]] == TensorProto.FLOAT16
    bn = next(n for n in g.node if n.op_type == "BatchNormalization")
    assert types[bn.input[0]] == types[bn.output[0]] == TensorProto.FLOAT16
    assert all(types[t] == TensorProto.FLOAT for t in bn.input[1:])  # opset 17: statistics keep float32
    assert types["soft"] == types["scaled"] == TensorProto.FLOAT
    assert {t.name: t.data_type for t in g.initializer}["w"] == TensorProto.FLOAT  # Mul still reads it in float32
    assert {t.name: t.data_type for t in g.initializer}["w/fp16"] == TensorProto.FLOAT16
    assert types["out"] == TensorProto.FLOAT and types[by_output["out"].input[0]] == TensorProto.FLOAT16
    casts = [n for n in g.node if n.op_type == "Cast"]
    producer = {out: n for n in g.node for out in n.output}
    # The model's own Cast pair stays; no new cast is made of its output back to a type it came from.
    added = [c for c in casts if c.output[0] not in ("as_double", "back")]
    assert all(producer.get(c.input[0]) is None or producer[c.input[0]].op_type != "Cast" for c in added)


def test_a_widening_cast_of_the_models_own_is_read_through_not_cast_back() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["half"], to=TensorProto.FLOAT16),   # narrowing: rounds, stays
        helper.make_node("Cast", ["half"], ["wide"], to=TensorProto.FLOAT),   # widening: exact
        helper.make_node("Conv", ["wide", "w"], ["y"]),
    ]
    for simulate in (False, True):
        model = to_mixed_precision(_tiny(nodes, ["y"], [_weight("w", 0.5)]), "fp16", simulate=simulate)
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        casts = [n.output[0] for n in model.graph.node if n.op_type == "Cast"]
        if simulate:  # the Conv reads the float32 widening of "half", rounds its output
            assert conv.input[0] == "wide" and casts == ["half", "wide", "y/fp16", "y"]
        else:  # the Conv reads "half"; the widening Cast, now unread, is gone
            assert conv.input[0] == "half" and casts == ["half", "y"]


def test_a_weight_beyond_fp16_range_is_named_and_bf16_takes_it() -> None:
    model = _tiny([helper.make_node("Conv", ["x", "big_kernel"], ["y"])], ["y"], [_weight("big_kernel", 1e5)])
    with pytest.raises(BundleError, match=r"weight 'big_kernel' holds 100000, beyond the fp16 range \(±65504\)"):
        to_mixed_precision(model, "fp16")
    with pytest.raises(BundleError, match="big_kernel"):
        to_mixed_precision(model, "fp16", simulate=True)
    # Kept in float32, it is not converted at all.
    model = _tiny([helper.make_node("Mul", ["x", "big"], ["m"]), helper.make_node("Exp", ["m"], ["y"])], ["y"],
                  [_weight("big", 1e5, (1,))])
    for low in ("fp16", "bf16"):
        converted = to_mixed_precision(model, low, keep_fp32=KEEP_FP32_OPS | {"Mul"})
        assert [t.data_type for t in converted.graph.initializer] == [TensorProto.FLOAT]
    bf16 = to_mixed_precision(_tiny([helper.make_node("Conv", ["x", "k"], ["y"])], ["y"], [_weight("k", 1e5)]), "bf16")
    (k,) = bf16.graph.initializer
    assert k.data_type == TensorProto.BFLOAT16 and bf16.opset_import[0].version == 22
    assert float(bf16_bits_to_float32(np.frombuffer(k.raw_data, "<u2"))[0]) == 99840.0  # 1e5 to 8 significant bits


def test_subgraphs_are_refused_with_a_sentence() -> None:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "c")
    model = _tiny([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="choose")],
                  ["y"], [cond])
    with pytest.raises(BundleError,
                       match=r"node 'choose' \(If\) has a subgraph; mixed precision handles straight-line"):
        to_mixed_precision(model, "fp16")
    with pytest.raises(ValueError, match="neither 'fp16' nor 'bf16'"):
        to_mixed_precision(model, "fp8")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ rounding


def test_bf16_rounds_to_nearest_even_like_ml_dtypes_and_onnxruntime_casts() -> None:
    import ml_dtypes

    rng = np.random.default_rng(0)
    special = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1.5 * 2**-126, 2**-140, 3.0e38, 3.4e38, np.inf, -np.inf,
                        0.0, -0.0, 65504, 65519, 65520, 1e-8, 6e-8, 1.5 * 2**-24, np.nan], np.float32)
    values = np.concatenate([special,
                             (rng.standard_normal(50_000) * np.exp(rng.uniform(-40, 40, 50_000))).astype(np.float32)])
    assert round_to(np.float32(1 + 2**-8), "bf16") == 1.0  # a tie goes to the even neighbour
    assert round_to(np.float32(1 + 3 * 2**-8), "bf16") == 1 + 2**-6
    assert np.isinf(round_to(np.float32(3.4e38), "bf16"))  # beyond the largest bf16 (3.39e38)
    bits = float32_to_bf16_bits(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(bf16_bits_to_float32(bits)).all()
    with np.errstate(over="ignore"):
        expected = {"bf16": values.astype(ml_dtypes.bfloat16).astype(np.float32),
                    "fp16": values.astype(np.float16).astype(np.float32)}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    for low, ours in expected.items():
        assert np.array_equal(round_to(values, low), ours, equal_nan=True), low  # type: ignore[arg-type]
        graph = helper.make_graph([helper.make_node("Cast", ["x"], ["m"], to=LOW[low]),
                                   helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT)], "rt", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        (out,) = _session(model).run(["y"], {"x": values})
        assert np.array_equal(out, ours, equal_nan=True), f"ONNX Runtime's Cast to {low} rounds otherwise"


def test_precision_agreement_figures() -> None:
    a = np.array([0.1, 0.6, 0.7, 0.4], np.float32)
    b = np.array([0.1, 0.4, 0.7, 0.6], np.float32)
    found = precision_agreement(a, b, 0.5)
    assert found["max_abs_diff"] == pytest.approx(0.2) and found["mean_abs_diff"] == pytest.approx(0.1)
    assert found["dice"] == pytest.approx(0.5) and found["changed"] == 2 and found["mask_voxels"] == 2
    assert precision_agreement(a, a, 0.9)["dice"] == 1.0  # both masks empty
    b[0] = np.nan
    assert precision_agreement(a, b)["nonfinite"] == 1
    with pytest.raises(ValueError, match="shapes"):
        precision_agreement(a, a[:2])


# ------------------------------------------------------------------------------------------ accuracy


def _phantom_input() -> np.ndarray:
    """The body-threshold network's input for a 40×96×96 patch of the synthetic CT phantom (5×4×4 mm,
    10 HU noise), normalised as its manifest says (clip to [−1024, 3071] HU, × 0.001)."""
    from tests.harness.synthetic_ct import phantom_hu

    z, y, x = np.meshgrid(np.arange(40) * 5.0 - 60, np.arange(96) * 4.0 - 190, np.arange(96) * 4.0 - 190, indexing="ij")
    hu = phantom_hu(np.stack([x, y, z], axis=-1)) + np.random.default_rng(1).normal(0, 10, z.shape)
    return (np.clip(hu, -1024, 3071) * 0.001).astype(np.float32)[None, None]


def test_body_threshold_in_fp16_and_bf16_keeps_its_labels(originals: dict[str, onnx.ModelProto]) -> None:
    image = _phantom_input()
    reference = _run(originals["body"], image)
    labels = reference.argmax(axis=1)
    found = {}
    for low, simulate in [("fp16", True), ("fp16", False), ("bf16", True)]:
        out = _run(to_mixed_precision(originals["body"], low, simulate=simulate), image)  # type: ignore[arg-type]
        agreement = precision_agreement(reference[:, 1], out[:, 1], 0.5)
        found[(low, simulate)] = out
        changed = int(np.count_nonzero(out.argmax(axis=1) != labels))
        # Stated tolerance: probabilities within 0.02 (fp16) / 0.1 (bf16); at most 0.02 % of the voxels
        # change label (the ones within rounding of the −300 HU threshold).
        limit = 0.02 if low == "fp16" else 0.1
        assert agreement["max_abs_diff"] <= limit, (low, simulate, agreement)
        assert changed <= 2e-4 * labels.size, (low, simulate, changed)
        assert agreement["max_abs_diff"] > 0, "nothing was rounded: ONNX Runtime removed the round trips?"
    # ONNX Runtime runs the real fp16 graph (Conv through its own casts to float32): it agrees with the simulation.
    assert np.abs(found[("fp16", False)] - found[("fp16", True)]).max() <= 2e-3


LIVER_CT = SHARED / "nifti" / "totalseg" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def liver_case(originals: dict[str, onnx.ModelProto]) -> tuple[np.ndarray, np.ndarray]:
    """(block, float32 probabilities) of the liver U-Net on the real CT, its block built by the node's
    own single-block pipeline (reorient, crop, resample, median, normalise, centre)."""
    if not LIVER_CT.is_file():
        pytest.skip(f"{LIVER_CT} not found (the real CT lives in ../shared/data)")
    from node.infer.block import segment_single_block
    from node.infer.manifest import load_bundle
    from node.model.volume import Volume
    from tests.harness.nifti import load_nifti_volume

    class Capture:
        name = "capture"
        block: np.ndarray

        def run(self, tiles: np.ndarray) -> np.ndarray:
            self.block = tiles.copy()
            return np.zeros((1, 1, 136, 136, 163), np.float32)

    voxels, geometry = load_nifti_volume(LIVER_CT)
    capture = Capture()
    segment_single_block(Volume(voxels.astype(np.float32), geometry, []), load_bundle(ENGINES / "liver"), capture)
    assert capture.block.shape == (1, 1, 162, 162, 189)
    return capture.block, _run(originals["liver"], capture.block)


# Stated tolerances on the real CT block (measured: fp16 max |Δp| 0.0034, mean 5.6e-5, Dice 0.99971,
# 41 of 70 286 voxels change; bf16 max 0.033, mean 4.9e-4, Dice 0.99754, 345 voxels change).
LIVER_TOLERANCE = {"fp16": {"max": 0.02, "mean": 5e-4, "dice": 0.999},
                   "bf16": {"max": 0.15, "mean": 3e-3, "dice": 0.99}}


@pytest.mark.parametrize("low", ["fp16", "bf16"])
def test_liver_in_low_precision_matches_float32_on_a_real_ct(originals: dict[str, onnx.ModelProto],
                                                              liver_case: tuple[np.ndarray, np.ndarray],
                                                              low: str) -> None:
    block, reference = liver_case
    out = _run(to_mixed_precision(originals["liver"], low, simulate=True), block)  # type: ignore[arg-type]
    found = precision_agreement(reference, out, 0.5)
    print(f"liver block, {low} simulated vs float32: max |dp| {found['max_abs_diff']:.4f}, "
          f"mean {found['mean_abs_diff']:.2e}, Dice {found['dice']:.4f}")  # the README's figures (pytest -s)
    tolerance = LIVER_TOLERANCE[low]
    assert found["mask_voxels"] > 50_000, "the liver is in the block"
    assert found["nonfinite"] == 0, found
    assert 0 < found["max_abs_diff"] <= tolerance["max"], found
    assert found["mean_abs_diff"] <= tolerance["mean"], found
    assert found["dice"] >= tolerance["dice"], found
