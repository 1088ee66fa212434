"""Rebuild an nnU-Net v2 network with nnU-Net's own code, load its folds, export one ONNX model.

Needs the ``[import]`` extra (torch, nnunetv2); nothing else in the node imports this module. The
exported graph takes (N, 1, D, H, W) normalised patches and returns (N, K, D, H, W) softmax
probabilities: the logits of the folds are averaged first (and, with mirroring, of the flipped
patches), as ``nnUNetPredictor`` averages them, then the softmax. ONNX Runtime is checked against
PyTorch on a random patch before the model is accepted.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.errors import BundleError
from node.nnunet.plans import CHECKPOINT, Configuration, Plans

log = logging.getLogger(__name__)

#: Largest |ONNX Runtime − PyTorch| of a probability on the random check patch that is accepted.
MAX_EXPORT_DIFFERENCE = 1e-3
OPSET = 17


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BundleError("importing an nnU-Net model needs torch and nnunetv2, which are not installed; "
                          "install the extra: pip install 'dicom-seg-node[import]' (or '.[import]' in a "
                          "checkout)") from None
    return torch


@dataclass(frozen=True)
class Folds:
    """The checkpoints of the chosen folds, as nnUNetPredictor reads them."""

    paths: tuple[Path, ...]
    trainer_name: str
    configuration: str
    mirror_axes: tuple[int, ...]
    weights: tuple[dict[str, Any], ...]


def load_folds(fold_dirs: list[Path]) -> Folds:
    torch = _torch()
    weights, first = [], None
    for directory in fold_dirs:
        path = directory / CHECKPOINT
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
            raise BundleError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
        if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint or "init_args" not in checkpoint:
            raise BundleError(f"{path}: expected an nnU-Net checkpoint (a dict with network_weights, init_args, "
                              "trainer_name)")
        if first is None:
            first = checkpoint
        weights.append(checkpoint["network_weights"])
    assert first is not None
    axes = first.get("inference_allowed_mirroring_axes") or ()
    return Folds(paths=tuple(d / CHECKPOINT for d in fold_dirs), trainer_name=str(first.get("trainer_name", "")),
                 configuration=str(first["init_args"].get("configuration", "3d_fullres")),
                 mirror_axes=tuple(int(a) for a in axes), weights=tuple(weights))


def build_network(plans: Plans, config: Configuration, trainer_name: str) -> Any:
    """The network as nnUNetPredictor builds it: the trainer's ``build_network_architecture`` when the
    trainer class is installed, else nnU-Net's ``get_network_from_plans`` on the plans' architecture."""
    _torch()
    import json

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_json = plans.directory / "plans.json"
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        trainer = recursive_find_trainer_class_by_name(trainer_name) if trainer_name else None
    except Exception:  # an unknown custom trainer: nnU-Net raises RuntimeError; fall back to the plans
        trainer = None
    try:
        if trainer is not None and "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
            manager = PlansManager(json.loads(plans_json.read_text(encoding="utf-8")))
            return trainer.build_network_architecture(manager, manager.get_configuration(config.name), 1,
                                                      plans.num_classes, enable_deep_supervision=False)
        return get_network_from_plans(config.network_class_name, config.arch_kwargs,
                                      list(config.arch_kwargs_requires_import), 1, plans.num_classes,
                                      allow_init=True, deep_supervision=False)
    except Exception as exc:
        raise BundleError(f"{plans_json}: cannot build the network {config.network_class_name} of configuration "
                          f"{config.name!r} ({type(exc).__name__}: {exc}); expected an architecture that "
                          "nnunetv2 and dynamic_network_architectures can build") from None


def _ensemble(networks: list[Any], mirror_axes: tuple[int, ...]) -> Any:
    torch = _torch()

    class Ensemble(torch.nn.Module):  # type: ignore[name-defined]
        """Mean of the folds' (and mirrors') logits, then softmax over the classes."""

        def __init__(self) -> None:
            super().__init__()
            self.folds = torch.nn.ModuleList(networks)

        def forward(self, x: Any) -> Any:
            flips = [()] + [tuple(a + 2 for a in axes) for n in range(1, len(mirror_axes) + 1)
                            for axes in _combinations(mirror_axes, n)]
            total: Any = 0.0
            for net in self.folds:
                for dims in flips:
                    out = net(torch.flip(x, dims)) if dims else net(x)
                    out = torch.flip(out, dims) if dims else out
                    total = total + out
            return torch.softmax(total / (len(self.folds) * len(flips)), dim=1)

    return Ensemble().eval()


def _combinations(axes: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.combinations(axes, n))


def export_onnx(plans: Plans, config: Configuration, folds: Folds, out: Path, *, mirror: bool) -> float:
    """Write the ensemble to ``out`` (ONNX, opset 17, dynamic batch, fixed patch); return the largest
    |ONNX Runtime − PyTorch| probability difference on a random patch (refused above 1e-3)."""
    torch = _torch()
    networks = []
    for path, state in zip(folds.paths, folds.weights, strict=True):
        net = build_network(plans, config, folds.trainer_name)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[1:2] or [str(exc)[:200]]
            raise BundleError(f"{path}: its weights do not fit the network plans.json describes for "
                              f"{config.name!r} ({first[0].strip()}); expected a checkpoint trained with these "
                              "plans") from None
        networks.append(net.eval())
    model = _ensemble(networks, folds.mirror_axes if mirror else ())
    generator = torch.Generator().manual_seed(0)
    patch = torch.randn((1, 1, *config.patch), generator=generator)
    with torch.no_grad():
        torch.onnx.export(model, (patch,), str(out), input_names=["image"], output_names=["probabilities"],
                          opset_version=OPSET, dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                          dynamo=False)
        expected = model(patch).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": patch.numpy()})[0]
    difference = float(np.max(np.abs(got - expected)))
    print(f"ONNX Runtime vs PyTorch on a random {'x'.join(map(str, config.patch))} patch: max |Δ| = {difference:.2e}")
    if not difference <= MAX_EXPORT_DIFFERENCE:
        raise BundleError(f"{out.name}: ONNX Runtime differs from PyTorch by {difference:.2e} on a random patch; "
                          f"expected at most {MAX_EXPORT_DIFFERENCE:g}")
    return difference
