"""The TensorRT plan cache without TensorRT: a builder function stands in for the TensorRT build
(the cache's own logic — keys, sidecars, checksums, atomic writes, locks, timing caches — is what is
tested; node/infer/gpu/trt_build.py is the only code that calls TensorRT)."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import pytest

from node.errors import InferenceError
from node.infer.gpu.plan_cache import PlanCache, PlanKey, TensorProfile

KEY = PlanKey(bundle="body-threshold@0.1.0", onnx_sha256="7c08" + "0" * 60, tensorrt_version="11.4.0.106",
              gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", precision="fp16",
              profiles=(TensorProfile("image", (1, 1, 32, 128, 128), (2, 1, 32, 128, 128), (32, 1, 32, 128, 128)),))


class CountingBuilder:
    def __init__(self, plan: bytes = b"PLAN-H100", timing: bytes = b"TIMING") -> None:
        self.calls: list[bytes | None] = []
        self.plan = plan
        self.timing = timing

    def __call__(self, timing: bytes | None) -> tuple[bytes, bytes]:
        self.calls.append(timing)
        return self.plan, self.timing + str(len(self.calls)).encode()


def test_a_plan_is_built_once_then_read_from_disk(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    build = CountingBuilder()
    first = cache.get_or_build(KEY, build)
    second = PlanCache(tmp_path).get_or_build(KEY, build)  # a later start: a new object, the same folder
    assert first.built and not second.built
    assert len(build.calls) == 1 and second.plan == first.plan == b"PLAN-H100"
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["key"]["gpu_name"] == "NVIDIA H100 80GB HBM3" and meta["key"]["tensorrt_version"] == "11.4.0.106"


def test_the_timing_cache_is_kept_per_gpu_and_fed_to_the_next_build(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    build = CountingBuilder()
    cache.get_or_build(KEY, build)
    other_bundle = dataclasses.replace(KEY, bundle="liver@0.3.0", onnx_sha256="217c" + "0" * 60)
    cache.get_or_build(other_bundle, build)
    assert build.calls == [None, b"TIMING1"]  # the second build starts from the first one's cache
    h200 = dataclasses.replace(KEY, gpu_name="NVIDIA H200")
    cache.get_or_build(h200, build)
    assert build.calls[-1] is None  # another GPU: its own timing cache
    assert cache.timing_cache_path(KEY) != cache.timing_cache_path(h200)


def test_a_concurrent_writer_s_timing_entries_are_merged_not_lost(tmp_path: Path) -> None:
    merged: list[tuple[bytes, bytes]] = []

    def merge(on_disk: bytes, ours: bytes) -> bytes:
        merged.append((on_disk, ours))
        return on_disk + b"+" + ours

    cache = PlanCache(tmp_path, merge_timing=merge)
    cache.get_or_build(KEY, CountingBuilder(timing=b"A"))
    cache.get_or_build(dataclasses.replace(KEY, bundle="liver@0.3.0"), CountingBuilder(timing=b"B"))
    assert merged == [(b"A1", b"B1")]
    assert cache.timing_cache_path(KEY).read_bytes() == b"A1+B1"


@pytest.mark.parametrize("field, value", [
    ("gpu_name", "NVIDIA A100-SXM4-40GB"),
    ("compute_capability", "8.0"),
    ("tensorrt_version", "10.16.1.11"),
    ("precision", "fp32"),
    ("onnx_sha256", "ffff" + "0" * 60),
])
def test_a_plan_from_another_gpu_or_version_is_never_used(tmp_path: Path, field: str, value: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Even copied by hand under the right file name, a plan whose sidecar records another key is rebuilt."""
    cache = PlanCache(tmp_path)
    changes: dict[str, Any] = {field: value}
    other = dataclasses.replace(KEY, **changes)
    foreign = cache.get_or_build(other, CountingBuilder(plan=b"PLAN-OTHER"))
    target = cache.plan_path(KEY)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(foreign.plan)
    target.with_suffix(".json").write_text(foreign.path.with_suffix(".json").read_text())
    build = CountingBuilder()
    with caplog.at_level(logging.WARNING):
        got = cache.get_or_build(KEY, build)
    assert got.built and got.plan == b"PLAN-H100" and len(build.calls) == 1
    assert "built for another key" in caplog.text and field in caplog.text


def test_a_damaged_plan_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = PlanCache(tmp_path)
    first = cache.get_or_build(KEY, CountingBuilder())
    first.path.write_bytes(b"PLAN-H1OO")  # one flipped byte on disk
    with caplog.at_level(logging.WARNING):
        again = cache.get_or_build(KEY, CountingBuilder())
    assert again.built and "does not match its recorded sha256" in caplog.text


def test_a_plan_without_its_sidecar_is_not_trusted(tmp_path: Path) -> None:
    """A crash between writing the plan and its sidecar: the plan is rebuilt, not half-trusted."""
    cache = PlanCache(tmp_path)
    first = cache.get_or_build(KEY, CountingBuilder())
    first.path.with_suffix(".json").unlink()
    assert cache.lookup(KEY) is None
    assert cache.get_or_build(KEY, CountingBuilder()).built


def test_no_temporary_files_are_left_and_a_failed_build_leaves_no_plan(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)

    def failing(timing: bytes | None) -> tuple[bytes, bytes]:
        raise RuntimeError("out of memory in tactic 42")

    with pytest.raises(InferenceError,
                       match="building the TensorRT plan for body-threshold@0.1.0 failed: out of memory"):
        cache.get_or_build(KEY, failing)
    assert not cache.plan_path(KEY).exists()
    cache.get_or_build(KEY, CountingBuilder())
    assert not list(tmp_path.rglob("*.tmp"))


def test_stale_plans_are_listed(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    cache.get_or_build(KEY, CountingBuilder())
    old = dataclasses.replace(KEY, tensorrt_version="10.16.1.11")
    cache.get_or_build(old, CountingBuilder())
    assert cache.stale_plans([KEY]) == [cache.plan_path(old)]


def _slow_build_in_process(root: str, log_file: str, result_file: str) -> None:
    def build(timing: bytes | None) -> tuple[bytes, bytes]:
        with open(log_file, "a") as f:
            f.write("build\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        return b"PLAN-" + str(mp.current_process().pid).encode(), b"T"

    got = PlanCache(Path(root)).get_or_build(KEY, build)
    Path(result_file).write_bytes(got.plan)


def test_two_builders_at_once_build_once_and_agree(tmp_path: Path) -> None:
    """Two worker processes start on a GPU with no plan: one builds, the other waits and reads it."""
    ctx = mp.get_context("spawn")
    log_file = tmp_path / "builds.log"
    procs = [ctx.Process(target=_slow_build_in_process, args=(str(tmp_path / "engines"), str(log_file),
                                                              str(tmp_path / f"result-{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log_file.read_text().count("build") == 1
    results = {(tmp_path / f"result-{i}").read_bytes() for i in range(2)}
    assert len(results) == 1  # both use the one plan that was written
