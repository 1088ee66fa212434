"""`dicom-seg-node engines …`: doctor, build and bench for the inference engines.

doctor   the GPU (or why there is none), the CPU (model, AMX / AVX-512 BF16 / VNNI units, peak), what is
         installed, and per bundle: GPU precision, tile batch, expected time at this GPU's rates, whether
         its TensorRT plan is cached; the CPU backend and precision it gets, and its OpenVINO model
build    build (or verify) the TensorRT plans of the configured bundles into the state directory
bench    time per tile and per volume, GFLOP/s and the fraction of the GPU's roofline or the CPU's peak,
         per engine: TensorRT, ONNX Runtime and OpenVINO (FP32, and BF16 where the CPU has it)
export-triton  a Triton Inference Server model repository for the bundles (config.pbtxt, model.onnx, plans)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.config import NodeConfig
from node.errors import InferenceError
from node.infer.manifest import discover_bundles
from node.model.bundle import Bundle
from node.model.enums import EngineBackend

if TYPE_CHECKING:
    from node.infer.cpu.doctor import CpuReport


def _bundles(cfg: NodeConfig, args: argparse.Namespace) -> list[Bundle]:
    """The bundles these commands are about, a parts bundle as its networks (``total.organs``, …): each has
    its own model file, engine, plan and Triton model."""
    found = discover_bundles(cfg.bundles_dir, tuple(args.bundle) if args.bundle else cfg.bundles)
    return [network for bundle in found for network in (bundle.networks if bundle.parts else (bundle,))]


def cmd_doctor(cfg: NodeConfig, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from node.infer.gpu.doctor import (
        REFERENCE_SHAPE,
        REFERENCE_SPACING,
        describe_gpu,
        doctor,
    )

    report = doctor(_bundles(cfg, args), backend=cfg.engine_backend, state_dir=cfg.state_dir,
                    profile_path=Path(args.profile) if args.profile else None, gpu_index=cfg.gpu_index,
                    threads=cfg.engine_threads)
    console = Console(width=max(Console().width, 160))
    t = Table(title="what is installed")
    for c in ("component", "", "detail"):
        t.add_column(c, overflow="fold")
    for b in report.backends:
        t.add_row(b.name, "yes" if b.available else "no", escape(b.detail))
    console.print(t)
    if report.gpu is not None:
        label = "recorded GPU profile" if report.profile_is_recorded else "GPU"
        console.print(f"[bold]{label}:[/bold] {escape(describe_gpu(report.gpu))}")
    else:
        console.print(f"[bold]GPU:[/bold] none usable here: {escape(report.gpu_problem)}")
        console.print("  (pass --profile tests/data/gpu_profiles/h100-sxm-80gb.json to see what a GPU would do)")
    if report.rows:
        shape = "x".join(map(str, REFERENCE_SHAPE))
        spacing = "x".join(f"{s:g}" for s in REFERENCE_SPACING)
        t = Table(title=f"per bundle on this GPU (a volume: {shape} CT at {spacing} mm; "
                        "roofline: max(FLOPs / peak, unfused bytes / bandwidth))")
        for c in ("bundle", "precision", "sample", "GFLOP", "MB moved", "batch opt/max", "tiles/vol",
                  "roofline ms/tile", "roofline s/vol", "bound", "plan", "why"):
            t.add_column(c, overflow="fold")
        for r in report.rows:
            why = "; ".join(x for x in (r.why_precision, r.why_batch) if x)
            t.add_row(r.bundle, r.precision, r.sample, r.gflop, r.mb_moved, r.batch, r.tiles, r.per_tile_ms,
                      r.per_volume_s, r.bound, r.plan, escape(why))
        console.print(t)
    _print_cpu(console, report.cpu)
    if cfg.engine_backend is EngineBackend.TRITON:
        from node.infer.backends.triton import readiness

        t = Table(title=f"Triton at {cfg.triton.url}: each bundle's model (live, ready, tensors as expected)")
        for c in ("bundle", "model", "readiness"):
            t.add_column(c, overflow="fold")
        for row in readiness(_bundles(cfg, args), cfg.triton):
            t.add_row(*map(escape, row))
        console.print(t)
    console.print(f"[bold]this node will run:[/bold] {escape(report.verdict)}")
    return 0


def _print_cpu(console: Any, cpu: CpuReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]CPU:[/bold] {escape(cpu.cpu.describe())}")
    for precision, peak in cpu.peaks.items():
        console.print(f"  peak {precision.upper()}: {escape(peak.how)}")
    if cpu.openvino.available:
        console.print(f"  OpenVINO offers BF16 here: {'yes' if cpu.openvino_bf16 else 'no'}")
    if not cpu.rows:
        return
    t = Table(title=f"per bundle on this CPU ({cpu.backend or 'no CPU backend'} when the GPU does not run it)")
    for c in ("bundle", "backend", "precision", "model", "why"):
        t.add_column(c, overflow="fold")
    for r in cpu.rows:
        t.add_row(r.bundle, r.backend, r.precision, escape(r.model), escape(r.why))
    console.print(t)


def cmd_build(cfg: NodeConfig, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from node.infer.gpu.backend import (
        GpuSession,
        ensure_plan,
        plan_cache_for,
        plan_engine,
    )

    try:
        session = GpuSession(cfg.gpu_index)
    except InferenceError as exc:
        raise InferenceError(f"cannot build TensorRT plans here: {exc}") from exc
    cache = plan_cache_for(cfg.state_dir)
    t = Table(title=f"TensorRT plans for {session.profile.name} (TensorRT {session.tensorrt_version}) in {cache.root}")
    for c in ("bundle", "precision", "batch", "plan", "", "seconds", "MiB"):
        t.add_column(c, overflow="fold")
    keys = []
    for bundle in _bundles(cfg, args):
        if bundle.model_file is None:
            continue
        plan = plan_engine(bundle, session.profile, session.tensorrt_version)
        keys.append(plan.key)
        cached = ensure_plan(plan, cache, force=args.force)
        t.add_row(bundle.id, plan.precision.precision.value, f"{plan.sizing.min_batch}..{plan.sizing.max_batch}",
                  str(cached.path), "built" if cached.built else "cached", f"{cached.build_seconds:.1f}",
                  f"{len(cached.plan) / 2**20:.1f}")
    Console().print(t)
    stale = cache.stale_plans(keys)
    if stale:
        print(f"{len(stale)} plan(s) for other GPUs, TensorRT versions or models are not used: "
              f"{', '.join(map(str, stale))}")
    return 0


def cmd_bench(cfg: NodeConfig, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from node.infer.gpu.bench import bench

    rows, notes = bench(_bundles(cfg, args), state_dir=cfg.state_dir, repeats=args.repeats, gpu_index=cfg.gpu_index,
                        threads=cfg.engine_threads)
    t = Table(title=f"engines bench (median of {args.repeats}; a volume = the doctor's reference CT; "
                    "CPU rows: fraction of the CPU's peak at the row's precision)")
    for c in ("bundle", "engine", "batch", "ms/batch", "ms/tile", "tiles/s", "s/volume", "GFLOP/s",
              "of compute peak", "of bandwidth", "note"):
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(r.bundle, r.engine, str(r.batch), f"{r.per_batch_ms:,.1f}", f"{r.per_tile_ms:,.2f}",
                  f"{r.tiles_per_s:,.1f}", f"{r.per_volume_s:,.2f}", f"{r.achieved_tflops * 1e3:,.1f}",
                  r.compute_fraction, r.bandwidth_fraction, r.note)
    console = Console(width=max(Console().width, 160))
    console.print(t)
    for note in notes:
        console.print(escape(note))
    return 0


def cmd_export_triton(cfg: NodeConfig, args: argparse.Namespace) -> int:
    from node.infer.triton_repo import InstanceKind, export_repository

    kind = InstanceKind.CPU if args.instance_kind == "cpu" else InstanceKind.GPU
    done = export_repository(_bundles(cfg, args), Path(args.repo_dir), state_dir=cfg.state_dir, kind=kind,
                             max_batch=args.max_batch)
    for m in done:
        print(f"{m.model}: {m.kind}, max_batch_size {m.max_batch_size}, bundle {m.bundle} → {m.path}")
    print(f"{len(done)} model(s) in {args.repo_dir}; its README.md says how to start Triton and point nodes at it")
    return 0


def add_engines_parser(sub: argparse._SubParsersAction,
                       add_config: Callable[[argparse.ArgumentParser], None],
                       load: Callable[[argparse.Namespace], NodeConfig]) -> None:
    p = sub.add_parser("engines", help="inference engines: doctor, build, bench, export-triton",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="engines_command", required=True, metavar="VERB")

    def verb(name: str, helptext: str, run: Callable[[NodeConfig, argparse.Namespace], int]) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, help=helptext, description=helptext)
        add_config(v)
        v.add_argument("--bundle", action="append", metavar="NAME", help="only this bundle (repeatable)")
        v.set_defaults(func=lambda args: run(load(args), args))
        return v

    v = verb("doctor", "the GPU and the CPU, what is installed, and what it implies for each bundle", cmd_doctor)
    v.add_argument("--profile", metavar="JSON", help="plan for a recorded GPU profile instead of this machine's GPU")
    v = verb("build", "build the TensorRT plans of the configured bundles (needs a GPU and TensorRT)", cmd_build)
    v.add_argument("--force", action="store_true", help="rebuild even when a valid plan is cached")
    v = verb("bench", "time each engine per tile and per volume, against the GPU's roofline or the CPU's peak",
             cmd_bench)
    v.add_argument("--repeats", type=int, default=5, help="timed runs per engine (default 5)")
    v = verb("export-triton", "write a Triton Inference Server model repository for the bundles", cmd_export_triton)
    v.add_argument("repo_dir", metavar="REPO_DIR", help="the model repository to write (created if missing)")
    v.add_argument("--instance-kind", choices=("gpu", "cpu"), default="gpu",
                   help="instance_group kind of the ONNX models (default gpu; TensorRT plans are always gpu)")
    v.add_argument("--max-batch", type=int, default=8, help="max_batch_size of the ONNX models (default 8)")
