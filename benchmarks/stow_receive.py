"""Benchmark: receiving the same series by STOW-RS and by C-STORE, into the node, on this machine.

Run from the repository root::

    .venv/bin/python benchmarks/stow_receive.py [--slices 300] [--batch 50]

One synthetic CT series (``--slices`` slices of 512x512) is written once. Then, each into a fresh node
(``python -m node serve``, no destination, a quiet period of 600 s so nothing is segmented meanwhile):

- C-STORE: DCMTK's storescu pushes the series in one association;
- STOW-RS: dicomweb-client (the library) POSTs it to ``/dicomweb/studies``, ``--batch`` instances per request
  (read from disk beforehand, so the figure is the node's and the network's, not the sender's disk).

Images/s = slices / wall time of the push. The node makes every instance durable (file and folder fsynced,
then indexed) before it acknowledges it either way; the index is checked to hold every instance.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402

from tests.harness.dcmtk import free_port, storescu  # noqa: E402
from tests.harness.node_process import NodeProcess  # noqa: E402
from tests.harness.synthetic_ct import write_ct_series  # noqa: E402

TOKEN = "benchmark-stow-token-0123456789"


def _count(node: NodeProcess) -> int:
    with sqlite3.connect(node.state_dir / "index.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


def _node(root: Path, http_port: int) -> NodeProcess:
    root.mkdir(parents=True, exist_ok=True)
    token = root / "token"
    token.write_text(TOKEN)
    return NodeProcess(root, quiet_period_s=600, release_settle_s=600, extra_toml=(
        f'[metrics]\nport = {http_port}\nbind_address = "127.0.0.1"\n[dicomweb_in]\nenabled = true\n'
        f'max_body_mb = 65536\n[[dicomweb_in.senders]]\nname = "BENCH"\ntoken_file = "{token}"\n'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50, help="instances per STOW-RS request (default 50)")
    args = parser.parse_args()
    from dicomweb_client.api import DICOMwebClient

    with tempfile.TemporaryDirectory(prefix="stow-bench-") as tmp:
        root = Path(tmp)
        series = write_ct_series(root / "ct", slices=args.slices)
        size_mb = sum(p.stat().st_size for p in series.files) / 2**20
        rows = []
        with _node(root / "cstore", free_port()) as node:
            started = time.perf_counter()
            storescu("127.0.0.1", node.port, node.ae_title, series.directory)
            elapsed = time.perf_counter() - started
            assert _count(node) == args.slices
            rows.append(("C-STORE (DCMTK storescu, one association)", elapsed))
        datasets = [dcmread(p) for p in series.files]
        http_port = free_port()
        with _node(root / "stow", http_port) as node:
            client = DICOMwebClient(url=f"http://127.0.0.1:{http_port}/dicomweb",
                                    headers={"Authorization": f"Bearer {TOKEN}"})
            started = time.perf_counter()
            for i in range(0, len(datasets), args.batch):
                client.store_instances(datasets[i:i + args.batch])
            elapsed = time.perf_counter() - started
            assert _count(node) == args.slices
            rows.append((f"STOW-RS (dicomweb-client, {args.batch} per request)", elapsed))
    print(f"\n{args.slices} instances of 512x512 CT ({size_mb:.0f} MB), into the node, fsync before acknowledging")
    print(f"{'how':<48} {'seconds':>8} {'images/s':>9}")
    for name, seconds in rows:
        print(f"{name:<48} {seconds:>8.2f} {args.slices / seconds:>9.1f}")


if __name__ == "__main__":
    main()
