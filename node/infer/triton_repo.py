"""``engines export-triton``: a Triton Inference Server model repository for the node's bundles.

Per bundle with a network: ``<model>/config.pbtxt`` and ``<model>/1/model.onnx`` (Triton's onnxruntime
backend), and where TensorRT plans are cached under the state directory (``engines build``), a second
model ``<model>-trt`` with ``platform: "tensorrt_plan"`` and one plan per GPU compute capability
(``cc_model_filenames``). Inputs and outputs (names, datatypes, dims) come from the ONNX graph; the batch
dimension becomes ``max_batch_size`` with a ``dynamic_batching`` whose preferred batch is, on a GPU instance,
the node's GPU batch for the bundle's patch, on a CPU instance the bundle's ``[window] batch``. A README.md in
the repository says how to start Triton on it and point nodes at it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from node.errors import BundleError
from node.infer.gpu.plan import tile_batch_for_patch
from node.infer.gpu.plan_cache import slug
from node.model.bundle import Bundle
from node.model.enums import WindowMode

#: ONNX TensorProto element types → Triton's model-config datatypes.
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 6: "TYPE_INT32",
                  7: "TYPE_INT64", 3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}

#: The most tiles one request may carry when the bundle's own batch is smaller (the server batches up to it).
DEFAULT_MAX_BATCH = 8


class InstanceKind:
    GPU = "KIND_GPU"
    CPU = "KIND_CPU"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # TYPE_FP32 …
    shape: tuple[int, ...]  # the ONNX graph's, batch first; -1 where the graph leaves a dimension free


@dataclass(frozen=True)
class ExportedModel:
    bundle: str
    model: str  # the Triton model name (directory)
    kind: str  # "onnxruntime" or "tensorrt_plan"
    path: Path
    max_batch_size: int


def onnx_io(model_file: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs (initialisers excluded) and outputs."""
    import onnx

    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and others
        raise BundleError(f"cannot read the ONNX graph of {model_file}: {exc}") from exc
    weights = {i.name for i in graph.initializer}

    def spec(v: object) -> TensorSpec:
        t = v.type.tensor_type  # type: ignore[attr-defined]
        if t.elem_type not in ONNX_TO_TRITON:
            raise BundleError(f"{model_file.name}: tensor {v.name!r} has ONNX element type {t.elem_type}, "  # type: ignore[attr-defined]
                              "which Triton's model configuration does not name")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(v.name, ONNX_TO_TRITON[t.elem_type], dims)  # type: ignore[attr-defined]

    return [spec(i) for i in graph.input if i.name not in weights], [spec(o) for o in graph.output]


def preferred_batch(bundle: Bundle, kind: str = InstanceKind.CPU) -> int:
    """The batch the server's dynamic batcher aims for, which the node's TritonEngine also sends per request: on a
    GPU instance the batch the node's own GPU path takes for the patch (node/infer/gpu/plan.py: ≤ 2^24 voxels of
    tiles, e.g. 4 tiles of 160x128x112; never less than the bundle's ``[window] batch``); on a CPU instance the
    bundle's ``[window] batch`` (an imported nnU-Net bundle's 1). A single block: one."""
    if bundle.window.mode is WindowMode.SINGLE_BLOCK:
        return 1
    own = max(1, bundle.window.batch)
    return max(own, tile_batch_for_patch(bundle.window.patch)) if kind == InstanceKind.GPU else own


def _tensor_block(role: str, specs: list[TensorSpec], batched: bool) -> str:
    items = []
    for s in specs:
        dims = s.shape[1:] if batched else s.shape
        shape = ", ".join(map(str, dims))
        items.append(f'  {{\n    name: "{s.name}"\n    data_type: {s.datatype}\n    dims: [ {shape} ]\n  }}')
    return f"{role} [\n" + ",\n".join(items) + "\n]\n"


def model_config(name: str, *, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch: int, preferred: int,
                 kind: str, platform: str = "", backend: str = "", cc_plans: dict[str, str] | None = None) -> str:
    """A ``config.pbtxt`` (protobuf text of inference.ModelConfig). ``max_batch`` 0: the graph has a fixed
    batch dimension, which then stays in ``dims``."""
    batched = max_batch > 0
    lines = [f'name: "{name}"']
    lines.append(f'platform: "{platform}"' if platform else f'backend: "{backend}"')
    lines.append(f"max_batch_size: {max_batch}")
    text = "\n".join(lines) + "\n" + _tensor_block("input", inputs, batched) + _tensor_block("output", outputs, batched)
    if batched:
        text += (f"dynamic_batching {{\n  preferred_batch_size: [ {min(preferred, max_batch)} ]\n"
                 "  max_queue_delay_microseconds: 2000\n}\n")
    text += f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
    if cc_plans:
        text += "".join(f'cc_model_filenames {{\n  key: "{cc}"\n  value: "{f}"\n}}\n'
                        for cc, f in sorted(cc_plans.items()))
    return text


def cached_plans(bundle: Bundle, state_dir: Path) -> dict[str, tuple[Path, int]]:
    """The bundle's cached TensorRT plans for its current ONNX file: compute capability → (plan, max batch)."""
    found: dict[str, tuple[Path, int]] = {}
    for sidecar in sorted((state_dir / "engines" / slug(bundle.id)).glob("*.json")):
        try:
            key = json.loads(sidecar.read_text()).get("key", {})
        except (OSError, json.JSONDecodeError):
            continue
        plan = sidecar.with_suffix(".plan")
        if key.get("onnx_sha256") != bundle.model_sha256 or not plan.is_file():
            continue
        profiles = key.get("profiles") or [{}]
        max_batch = int((profiles[0].get("max") or [0])[0])
        found[str(key.get("compute_capability", ""))] = (plan, max_batch)
    return found


def export_bundle(bundle: Bundle, repo: Path, *, state_dir: Path, model: str | None = None,
                  kind: str = InstanceKind.GPU, max_batch: int = DEFAULT_MAX_BATCH) -> list[ExportedModel]:
    """Write the bundle's model(s) into ``repo``; a built-in algorithm (no network) exports nothing."""
    if bundle.model_file is None:
        return []
    name = model or bundle.name
    inputs, outputs = onnx_io(bundle.model_file)
    batched = all(s.shape and s.shape[0] == -1 for s in (*inputs, *outputs))
    preferred = preferred_batch(bundle, kind)
    # A single block (a whole volume, GBs of activations) is not batched further; tiles are, up to max_batch (or the
    # bundle's own batch where that is larger); a GPU preferred batch above max_batch is cut to it (model_config).
    single = bundle.window.mode is WindowMode.SINGLE_BLOCK
    size = (preferred if single else max(max_batch, preferred_batch(bundle, InstanceKind.CPU))) if batched else 0
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle.model_file, repo / name / "1" / "model.onnx")
    (repo / name / "config.pbtxt").write_text(model_config(
        name, inputs=inputs, outputs=outputs, max_batch=size, preferred=preferred, kind=kind, backend="onnxruntime"))
    done = [ExportedModel(bundle.name, name, "onnxruntime", repo / name, size)]
    plans = cached_plans(bundle, state_dir)
    if plans:
        trt = f"{name}-trt"
        (repo / trt / "1").mkdir(parents=True, exist_ok=True)
        files = {}
        for cc, (plan, _) in plans.items():
            files[cc] = f"model_cc{cc}.plan"
            shutil.copyfile(plan, repo / trt / "1" / files[cc])
        plan_batch = min(b for _, b in plans.values()) if batched else 0
        (repo / trt / "config.pbtxt").write_text(model_config(
            trt, inputs=inputs, outputs=outputs, max_batch=plan_batch,
            preferred=preferred_batch(bundle, InstanceKind.GPU), kind=InstanceKind.GPU,
            platform="tensorrt_plan", cc_plans=files))
        done.append(ExportedModel(bundle.name, trt, "tensorrt_plan", repo / trt, plan_batch))
    return done


README = """# Triton model repository for dicom-seg-node

Written by `dicom-seg-node engines export-triton`. One directory per model: `config.pbtxt` and version `1/`
(`model.onnx` for Triton's onnxruntime backend; `<model>-trt` holds TensorRT plans per GPU compute
capability, `cc_model_filenames`, and runs only on a GPU of a listed capability with the same TensorRT).

Models: {models}

## Start Triton on it

Docker (NVIDIA's image; `--gpus all` for KIND_GPU instances, drop it for a CPU-only server):

    docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
        -v "$PWD":/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
        tritonserver --model-repository=/models

Bare metal (a tritonserver build with the onnxruntime and tensorrt backends):

    tritonserver --model-repository="$PWD" --backend-directory=/opt/tritonserver/backends

`curl -sf http://HOST:8000/v2/health/ready` answers 200 once every model is loaded.
A server without a GPU runs the ONNX models after `export-triton --instance-kind cpu`.

## Point nodes at it

In each node's configuration:

    [engines]
    backend = "triton"

    [triton]
    url = "grpc://HOST:8001"        # or http://HOST:8000; grpcs:// with root_certificates for TLS
    # [triton.models]               # only where a model is not named after its bundle, e.g.
    # liver = "liver-trt"

The node keeps its pre- and post-processing, spool and index; only the networks run on Triton. A node
starts and receives while Triton is down: jobs wait in the queue (retried with a backoff) until it answers.
"""


def export_repository(bundles: list[Bundle], repo: Path, *, state_dir: Path, kind: str = InstanceKind.GPU,
                      max_batch: int = DEFAULT_MAX_BATCH) -> list[ExportedModel]:
    """Export every bundle with a network into ``repo`` and write its README.md."""
    repo.mkdir(parents=True, exist_ok=True)
    done: list[ExportedModel] = []
    for bundle in bundles:
        done += export_bundle(bundle, repo, state_dir=state_dir, kind=kind, max_batch=max_batch)
    listing = ", ".join(f"`{m.model}` ({m.kind}, bundle {m.bundle})" for m in done) or "none"
    (repo / "README.md").write_text(README.format(models=listing))
    return done
