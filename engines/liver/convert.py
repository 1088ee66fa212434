"""Convert the pyliverlesionseg 0.3 liver U-Net (Keras 2.2 HDF5 weights) to ONNX, without TensorFlow.

Run::

    python engines/liver/convert.py --wheel ../shared/models/pyliverlesionseg-0.3-py3-none-any.whl \
        --out engines/liver/model.onnx

The wheel (Apache-2.0, KU Leuven; Tang et al. 2020) ships only the weights
(``pyliverlesionseg/trained_models/model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_20201011_
dice_loss_val_binary_dice_mean.hdf5``, Keras 2.2.2, 15 Conv3D layers, 3 874 961 parameters); the
graph is rebuilt here from the package's source with the onnx helper API (opset 17). The output is
deterministic: the same wheel gives the same bytes, hence the same sha256.

Architecture (create_unet_like_model, pyliverlesionseg/architectures/unet_generalized.py, called by
unet_liver_predict, cnn_liver_lesion_seg_CT_MR_functions.py:152-177):

* 4 levels, max pooling 3×3×3 stride 3 (unet_generalized.py:269, 132); features per level
  down [20, 40] [40, 80] [80, 160] [160, 160], up [160, 80] [80, 40] [40, 20];
  kernels down (3,3,1),(3,3,3), up (3,3,3),(3,3,1), bottom (3,3,3),(3,3,3) — in the package's
  (x, y, z) order, so the (3,3,1) kernels are in-plane (1 along z);
* convolutions ``padding='same'`` (zero padding, functions.py:173) — the network still shrinks by 26
  voxels per axis because each 'linear' upsampling is UpSampling3D(3) (nearest) followed by
  AveragePooling3D(3, strides=1, padding='valid') (unet_generalized.py:141-146), which loses 2
  voxels at its level: 27k → 27k-26 overall. Input sizes must be multiples of 27 (pooling by 3 three
  times); 189×162×162 → 163×136×136 in the package (functions.py:1200);
* skip connections are centre-cropped (Cropping3D, unet_generalized.py:298: 1, 4 and 13 voxels per
  side at levels 3, 2, 1) and concatenated as [skip, upsampled] (line 299);
* before every convolution except the first: instance normalisation then LeakyReLU(0.01)
  (lines 280-283, 307-309, 325-327; normalisation at line 105: ``(x - mean) / (std + 1e-7)`` with the
  population std over the three spatial axes, per sample and channel). The input itself is not
  normalised by the network (instance_normalization_on_input=False); the pooled tensors are the
  convolutions' outputs before any activation;
* the alignment AveragePooling3D of line 295 has pool size 1 here (identity) and is omitted;
* a final 1×1×1 convolution to one channel with a sigmoid (line 333).

ONNX tensors and axis order:

* input ``image`` float32 (N, 1, D, H, W), D/H/W dynamic, each a multiple of 27;
* output ``probabilities`` float32 (N, 1, D-26, H-26, W-26), the sigmoid (liver probability);
  output voxel (d, h, w) is input voxel (d+13, h+13, w+13).
* (D, H, W) = (z, y, x) of the package's network-input array, i.e. the package's array transposed
  (2, 1, 0): ``image[n, 0, d, h, w] == package_block[w, h, d]``. The package's block is the
  pymirc LPS volume (axis 0 → patient left, 1 → posterior, 2 → superior) flipped on axes 0 and 1
  (functions.py:1189, "RAS"). So in patient terms: D runs inferior → superior, H posterior →
  anterior, W patient-left → patient-right. For an axial head-first CT with ImageOrientationPatient
  (1,0,0,0,1,0) read as a (slices, rows, columns) volume with slices ascending along the normal
  (+z), that is ``volume[:, ::-1, ::-1]``. Keras kernels (kx, ky, kz, Cin, Cout) become ONNX
  weights (Cout, Cin, kz, ky, kx) (transpose 4,3,2,1,0); both are cross-correlations.

Graph forms: by default two exact rewrites make it faster in ONNX Runtime (≈10 s instead of ≈15 s
for a 189×162×162 block on 2 cores): nearest ×3 + 3×3×3 average pool is emitted as
Resize(linear, align_corners) to 3n-2 (identical maths, see ``_Graph.upsample``), and
norm→LeakyReLU→Conv of [skip, upsampled] is emitted as two convolutions over the two channel groups,
added (norm and activation are per channel), so the 80-channel concatenation is never built.
``--literal`` emits Keras' op pairs instead; both agree with reference.py to ~2e-6.

Numerics: instance-norm statistics over millions of voxels summed in float32 drift (1e-2 at the
output). Here every mean is taken one axis at a time (W, then H, then D: ≤ 189 terms per sum),
which keeps ONNX Runtime within ~2e-6 of a float64 reference (reference.py).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WHEEL_SHA256 = "ffe1576aefff5922ea8d1cfa2c50864cda97798798559542b9517689fd290cb8"
HDF5_MEMBER = (
    "pyliverlesionseg/trained_models/"
    "model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_20201011_dice_loss_val_binary_dice_mean.hdf5"
)
OPSET = 17
EPSILON = 1e-7
ALPHA = 0.01
#: Network output is this much smaller than its input along each axis.
SHRINK = 26
#: Input sizes must be multiples of this.
MULTIPLE = 27

# (name, kernel (kx, ky, kz) in package order, C_in, C_out) in Keras creation order.
CONVS = [
    ("conv3d_1", (3, 3, 1), 1, 20),
    ("conv3d_2", (3, 3, 3), 20, 40),
    ("conv3d_3", (3, 3, 1), 40, 40),
    ("conv3d_4", (3, 3, 3), 40, 80),
    ("conv3d_5", (3, 3, 1), 80, 80),
    ("conv3d_6", (3, 3, 3), 80, 160),
    ("conv3d_7", (3, 3, 3), 160, 160),
    ("conv3d_8", (3, 3, 3), 160, 160),
    ("conv3d_9", (3, 3, 3), 320, 160),
    ("conv3d_10", (3, 3, 1), 160, 80),
    ("conv3d_11", (3, 3, 3), 160, 80),
    ("conv3d_12", (3, 3, 1), 80, 40),
    ("conv3d_13", (3, 3, 3), 80, 40),
    ("conv3d_14", (3, 3, 1), 40, 20),
    ("conv3d_15", (1, 1, 1), 20, 1),
]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_keras_weights(wheel: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(layer name, kernel (kx,ky,kz,Ci,Co), bias (Co,))] in the file's layer order (Keras load order)."""
    import h5py

    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(HDF5_MEMBER)
    out = []
    with h5py.File(io.BytesIO(data), "r") as f:
        if f.attrs.get("keras_version") is not None:
            version = f.attrs["keras_version"]
            version = version.decode() if isinstance(version, bytes) else str(version)
            if not version.startswith("2."):
                raise ValueError(f"unexpected keras_version {version}")
        for raw in f.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            wnames = [w.decode() if isinstance(w, bytes) else str(w) for w in f[name].attrs["weight_names"]]
            if not wnames:
                continue
            if len(wnames) != 2:
                raise ValueError(f"layer {name}: expected kernel and bias, got {wnames}")
            kernel = np.array(f[name][wnames[0]], dtype=np.float32)
            bias = np.array(f[name][wnames[1]], dtype=np.float32)
            if not (wnames[0].endswith("kernel:0") and wnames[1].endswith("bias:0")):
                raise ValueError(f"layer {name}: unexpected weight names {wnames}")
            out.append((name, kernel, bias))
    return out


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    # ---- layers
    def conv(self, x: str, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> str:
        # Keras (kx, ky, kz, Ci, Co) → ONNX (Co, Ci, kz, ky, kx): our D, H, W are the package's z, y, x.
        w = np.ascontiguousarray(np.transpose(kernel, (4, 3, 2, 1, 0)))
        ks = list(w.shape[2:])
        pads = [(k - 1) // 2 for k in ks] + [(k - 1) - (k - 1) // 2 for k in ks]  # 'same', stride 1
        inputs = [x, self.const(f"{name}/kernel", w)]
        if bias is not None:
            inputs.append(self.const(f"{name}/bias", bias.astype(np.float32)))
        return self.op("Conv", inputs, hint=name, kernel_shape=ks, pads=pads, strides=[1, 1, 1])

    def spatial_mean(self, x: str) -> str:
        # One axis at a time: each partial sum has at most max(D, H, W) float32 terms.
        for axis in (4, 3, 2):
            x = self.op("ReduceMean", [x], hint="mean", axes=[axis], keepdims=1)
        return x

    def instance_norm(self, x: str) -> str:
        mean = self.spatial_mean(x)
        centred = self.op("Sub", [x, mean], hint="centred")
        var = self.spatial_mean(self.op("Mul", [centred, centred], hint="sq"))
        std = self.op("Sqrt", [var], hint="std")
        denom = self.op("Add", [std, "epsilon"], hint="denom")
        return self.op("Div", [centred, denom], hint="inorm")

    def norm_act(self, x: str) -> str:
        return self.op("LeakyRelu", [self.instance_norm(x)], hint="lrelu", alpha=ALPHA)

    def max_pool(self, x: str) -> str:
        return self.op("MaxPool", [x], hint="maxpool", kernel_shape=[3, 3, 3], strides=[3, 3, 3])

    def upsample(self, x: str, literal: bool) -> str:
        """UpSampling3D(3) (repeat) then AveragePooling3D(3, strides=1, padding='valid'): n → 3n-2.

        Output index o averages repeated samples floor(o/3), floor((o+1)/3), floor((o+2)/3), i.e.
        x[k], (2x[k]+x[k+1])/3, (x[k]+2x[k+1])/3 for o = 3k, 3k+1, 3k+2: exactly linear
        interpolation at o/3 = o·(n-1)/(3n-3), which is Resize(linear, align_corners) to 3n-2
        (separable, so the same holds in 3-D). That form is cheaper in ONNX Runtime; ``literal``
        keeps the Keras op pair.
        """
        if literal:
            up = self.op(
                "Resize", [x, "", "up_scales"], hint="upsample", mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor",
            )
            return self.op("AveragePool", [up], hint="avgpool", kernel_shape=[3, 3, 3], strides=[1, 1, 1])
        shape = self.op("Shape", [x], hint="shape")
        batch_channels = self.op("Slice", [shape, "i64_0", "i64_2"], hint="nc")
        spatial = self.op("Slice", [shape, "i64_2", "i64_5"], hint="dhw")
        spatial = self.op("Sub", [self.op("Mul", [spatial, "i64_3"], hint="dhw3"), "i64_2"], hint="dhw3m2")
        sizes = self.op("Concat", [batch_channels, spatial], hint="sizes", axis=0)
        return self.op("Resize", [x, "", "", sizes], hint="upsample", mode="linear",
                       coordinate_transformation_mode="align_corners")

    def crop(self, x: str, c: int) -> str:
        starts = self.const(f"crop{c}_starts", np.array([c, c, c], dtype=np.int64))
        ends = self.const(f"crop{c}_ends", np.array([-c, -c, -c], dtype=np.int64))
        axes = "spatial_axes"
        return self.op("Slice", [x, starts, ends, axes], hint=f"crop{c}")


def build(wheel: Path, literal: bool = False) -> onnx.ModelProto:
    """The ONNX model. ``literal=True`` keeps Keras' op pairs (Resize nearest + AveragePool, Concat
    then one Conv); the default uses equivalent, faster forms (see ``upsample`` and below)."""
    weights = read_keras_weights(wheel)
    if len(weights) != len(CONVS):
        raise ValueError(f"expected {len(CONVS)} convolutions in the HDF5, found {len(weights)}")
    for (name, kernel, bias), (expected, ks, ci, co) in zip(weights, CONVS):
        if name != expected:
            raise ValueError(f"convolution order: found {name} where {expected} was expected")
        if kernel.shape != tuple(ks) + (ci, co) or bias.shape != (co,):
            raise ValueError(f"{name}: kernel {kernel.shape} bias {bias.shape}, expected {tuple(ks) + (ci, co)}")
    w = iter(weights)

    g = _Graph()
    g.const("epsilon", np.array(EPSILON, dtype=np.float32))
    g.const("spatial_axes", np.array([2, 3, 4], dtype=np.int64))
    if literal:
        g.const("up_scales", np.array([1, 1, 3, 3, 3], dtype=np.float32))
    else:
        for v in (0, 2, 3, 5):
            g.const(f"i64_{v}", np.array([v], dtype=np.int64))

    def conv(x: str) -> str:
        name, kernel, bias = next(w)
        return g.conv(x, name, kernel, bias)

    # Down. Level 1 (full resolution): the first convolution sees the raw input.
    x = conv("image")
    l1 = conv(g.norm_act(x))  # 40 ch
    x = g.max_pool(l1)  # level 2 (÷3)
    x = conv(g.norm_act(x))
    l2 = conv(g.norm_act(x))  # 80 ch
    x = g.max_pool(l2)  # level 3 (÷9)
    x = conv(g.norm_act(x))
    l3 = conv(g.norm_act(x))  # 160 ch
    x = g.max_pool(l3)  # level 4 (÷27)
    x = conv(g.norm_act(x))
    x = conv(g.norm_act(x))  # 160 ch

    # Up. Each upsampling gives 3n-2; the skip is centre-cropped to match and goes first.
    for skip, crop, n_skip in ((l3, 1, 160), (l2, 4, 80), (l1, 13, 40)):
        x = g.upsample(x, literal)
        skip = g.crop(skip, crop)
        if literal:
            x = conv(g.norm_act(g.op("Concat", [skip, x], hint="concat", axis=1)))
        else:
            # Instance norm and LeakyReLU act per channel, so norm_act(concat(s, u)) ==
            # concat(norm_act(s), norm_act(u)), and a convolution of a concatenation is the sum of
            # the convolutions of its parts with the matching input-channel slices of the kernel.
            # This avoids materialising the concatenation (up to 80 ch × 3 M voxels).
            name, kernel, bias = next(w)
            from_skip = g.conv(g.norm_act(skip), f"{name}/skip", kernel[:, :, :, :n_skip], None)
            from_up = g.conv(g.norm_act(x), f"{name}/up", kernel[:, :, :, n_skip:], bias)
            x = g.op("Add", [from_skip, from_up], hint=name)
        x = conv(g.norm_act(x))

    # Common pathway: norm, LeakyReLU, 1×1×1 conv, sigmoid.
    x = conv(g.norm_act(x))
    g.nodes.append(helper.make_node("Sigmoid", [x], ["probabilities"], name="probabilities"))
    assert next(w, None) is None

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 1, "D_out", "H_out", "W_out"])
    graph = helper.make_graph(g.nodes, "pyliverlesionseg_liver_unet", [image], [probs], g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="dicom-seg-node engines/liver/convert.py",
        doc_string=(
            "Liver U-Net of pyliverlesionseg 0.3 (Apache-2.0, KU Leuven; Tang et al. 2020), converted from "
            "its Keras HDF5 weights. Input image (N,1,D,H,W), D/H/W multiples of 27, (D,H,W) = package (z,y,x) "
            "of the RAS-flipped 3 mm block, CT as clip(HU/1000,-0.2,0.2)*2.5. Output probabilities "
            "(N,1,D-26,H-26,W-26), sigmoid; output voxel i is input voxel i+13."
        ),
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(
        int(np.prod(t.dims)) for t in model.graph.initializer if t.name.endswith("/kernel") or t.name.endswith("/bias")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert the pyliverlesionseg 0.3 liver U-Net to ONNX.")
    ap.add_argument("--wheel", required=True, type=Path, help="pyliverlesionseg-0.3-py3-none-any.whl")
    ap.add_argument("--out", required=True, type=Path, help="output .onnx path")
    ap.add_argument("--no-verify", action="store_true", help="skip the wheel's sha256 check")
    ap.add_argument("--literal", action="store_true",
                    help="keep Keras' op pairs (Resize nearest + AveragePool, Concat + Conv); slower, same result")
    args = ap.parse_args(argv)

    digest = sha256_file(args.wheel)
    if digest != WHEEL_SHA256 and not args.no_verify:
        print(f"error: {args.wheel} has sha256 {digest}, expected {WHEEL_SHA256}", file=sys.stderr)
        return 2
    model = build(args.wheel, literal=args.literal)
    data = model.SerializeToString()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"{args.out} parameters={parameter_count(model)} bytes={len(data)} sha256={hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
