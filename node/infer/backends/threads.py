"""How many CPU threads a network engine runs on.

The worker runs the jobs of one series at once (node/jobs/series.py): the network of one bundle (the liver
U-Net) beside the built-in body-lungs bundle, which keeps about one core busy. A network given every core
then fights that job for them: on 2 cores the liver block took 15–17 s with OpenVINO's 2 threads beside
other work, and 9 s on 1 thread (issue 16). So unless ``engines.threads`` says otherwise, a network gets
every usable CPU but one, and at least one.
"""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, as a container or ``taskset`` limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def network_threads(configured: int, cpus: int | None = None) -> int:
    """``configured`` (``engines.threads``) when set; else every usable CPU but one (at least one)."""
    if configured > 0:
        return configured
    return max(1, (usable_cpus() if cpus is None else cpus) - 1)
