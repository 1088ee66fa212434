"""The CPUs a worker may use, and the turns its memory-heavy steps take.

The worker runs the jobs of one series at once (node/jobs/series.py): on two cores, body-lungs' segmentation
beside the liver network's preprocessing, and one job's writing beside the other's post-processing. Running
them fully at once also adds their memory: the liver block's activations (about 1.2 GB in BF16) on top of
body-lungs' working arrays took the worker to 2.4–2.5 GB, and a network given every core, fighting another
job for them, ran at half speed. :data:`HEAVY_STEP` makes the large steps take turns: a CPU network's run,
a built-in bundle's segmentation, cleaning its labels and writing a job's results each hold it
(:func:`heavy_step`), while the rest (reading, a network's preprocessing and post-processing) overlaps
freely. The network then has the machine to itself, on every core (``engines.threads = 0``), and the
worker's peak stays near one network's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from node.infer.memory import release_free_memory

#: Held by one memory-heavy step at a time in this process: a CPU engine's run (node/infer/backends/onnxrt.py,
#: openvino.py), a built-in bundle's segmentation, cleaning or writing a job's results (node/jobs/pipeline.py).
HEAVY_STEP = threading.RLock()


@contextmanager
def heavy_step() -> Iterator[None]:
    """Hold :data:`HEAVY_STEP`, and give the heap's free pages back to the system first (what the step before,
    in this job or another, freed), so that this step's peak is not added to the last one's."""
    with HEAVY_STEP:
        release_free_memory()
        yield


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, as a container or ``taskset`` limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
