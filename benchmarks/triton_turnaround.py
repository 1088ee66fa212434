"""Benchmark: the node on ``engines.backend = "triton"`` beside the in-process CPU backend, same machine and series.

Run from the repository root::

    .venv/bin/python benchmarks/triton_turnaround.py [--slices 300] [--threads 2] [--tiles 16]

1. **Per tile.** The body-threshold bundle's engine on ``--tiles`` random 32x128x128 tiles in the window's
   batches of 2: ONNX Runtime in process, and the TritonEngine against a real tritonserver on 127.0.0.1
   (tests/harness/triton.py: the nvidia-pytriton wheel's binary, the model in its Python backend through
   ONNX Runtime with the same ``--threads``). The difference is what a request to Triton costs on loopback.
2. **Per series.** A synthetic CT (``--slices`` x 512x512, 0.8 mm, 2.5 mm slices) is pushed by storescu into
   a node (``python -m node serve``) with backend ``cpu`` and then ``triton``, each with a storescp
   destination; reported: the job's stage timings (``jobs.timings``: read, assemble, infer, write) and the
   time from the end of the push to both results at storescp (quiet period 2 s included).

No GPU is involved: Triton runs the model on this machine's CPU, so the figures say what the node's side and
the wire cost, not what a GPU server would add.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.config_triton import TritonConfig  # noqa: E402
from node.infer.backends.onnxrt import OnnxRuntimeEngine  # noqa: E402
from node.infer.backends.triton import TritonEngine  # noqa: E402
from node.infer.manifest import load_bundle  # noqa: E402
from tests.harness.dcmtk import StoreSCP, storescu  # noqa: E402
from tests.harness.node_process import NodeProcess  # noqa: E402
from tests.harness.synthetic_ct import write_ct_series  # noqa: E402
from tests.harness.triton import TritonServer, stub_env, unavailable_reason, write_python_model  # noqa: E402

MODEL = "body-threshold"


def per_tile(engine: object, tiles: np.ndarray, batch: int) -> float:
    run = engine.run  # type: ignore[attr-defined]
    run(tiles[:batch])  # warm-up
    started = time.perf_counter()
    for b in range(0, len(tiles), batch):
        run(tiles[b:b + batch])
    return (time.perf_counter() - started) * 1000 / len(tiles)


def per_series(work: Path, series_dir: Path, toml: str, name: str) -> dict[str, float]:
    with StoreSCP(work / f"pacs-{name}", ae_title="PACS") as pacs:
        node = NodeProcess(work / f"node-{name}", destinations=[f"PACS@127.0.0.1:{pacs.port}"], extra_toml=toml,
                           quiet_period_s=2.0, release_settle_s=0.5)
        with node:
            storescu("127.0.0.1", node.port, node.ae_title, series_dir)
            pushed = time.perf_counter()
            pacs.wait_for_files(2, timeout=900)
            turnaround = time.perf_counter() - pushed
        with sqlite3.connect(node.state_dir / "index.sqlite3") as db:
            (timings,) = db.execute("SELECT timings FROM jobs").fetchone()
    return {"turnaround_s": round(turnaround, 2), **json.loads(timings)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiles", type=int, default=16)
    args = p.parse_args()
    if reason := unavailable_reason():
        print(f"a Triton server cannot run here: {reason}")
        return 1
    bundle = load_bundle(REPO / "engines" / MODEL)
    assert bundle.model_file is not None
    env, _ = stub_env()
    assert env is not None
    with tempfile.TemporaryDirectory(prefix="triton-bench-") as tmp:
        work = Path(tmp)
        write_python_model(work / "repo", MODEL, bundle.model_file, env, max_batch=4, preferred=2,
                           threads=args.threads)
        with TritonServer(work / "repo", work / "server") as server:
            tiles = np.random.default_rng(0).uniform(-1, 1.5, (args.tiles, 1, 32, 128, 128)).astype(np.float32)
            cpu = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name,
                                    output_name=bundle.output_name, threads=args.threads)
            triton = TritonEngine(bundle, TritonConfig(url=server.grpc_url))
            print(f"ms per tile (batches of {bundle.window.batch}, {args.threads} threads): "
                  f"onnxruntime in process {per_tile(cpu, tiles, bundle.window.batch):.1f}, "
                  f"triton gRPC {per_tile(triton, tiles, bundle.window.batch):.1f}")
            triton.close()
            series = write_ct_series(work / "ct", slices=args.slices)
            base = f'[engines]\nbundles = ["{MODEL}"]\nthreads = {args.threads}\n'
            rows = {
                "cpu": per_series(work, series.directory, base + 'backend = "cpu"\n', "cpu"),
                "triton": per_series(work, series.directory, base + 'backend = "triton"\n'
                                     f'[triton]\nurl = "{server.grpc_url}"\n', "triton"),
            }
    keys = ["turnaround_s", "read", "assemble", "infer", "write", "total"]
    print(f"per series ({args.slices} x 512x512 CT), seconds:")
    print("| backend | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.2f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
