"""TensorRTEngine's own logic on CPU stand-ins for tensorrt and pycuda (tests/harness/fake_gpu.py):
batches split at the profile's maximum, two slots alternating, the results in input order, compute
chained across streams, errors as sentences. What the real libraries do is tests/gpu's business."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from node.errors import InferenceError
from tests.harness.fake_gpu import installed, make_pycuda, make_tensorrt

TILE = (4, 6, 8)


def network(x: np.ndarray) -> np.ndarray:
    """(N, 1, *TILE) → (N, 2, *TILE): channel 1 = x * 2 + the tile's index in its batch, channel 0 = -x."""
    index = np.arange(len(x), dtype=np.float32).reshape(-1, 1, 1, 1, 1)
    return np.concatenate([-x, x * 2 + index], axis=1)


def make_engine(log: list[str], max_batch: int = 3):
    from node.infer.gpu.trt_engine import CudaContext, TensorRTEngine

    context = CudaContext(0)
    return TensorRTEngine(b"PLAN", name="fake", input_name="image", output_name="probabilities", max_batch=max_batch,
                          context=context)


@pytest.mark.parametrize("n", [1, 3, 4, 7, 9])
def test_run_returns_every_tile_in_order_through_alternating_slots(n: int) -> None:
    log: list[str] = []
    with installed(make_tensorrt(network, TILE, 2, TILE, log), make_pycuda(log)):
        engine = make_engine(log)
        tiles = np.random.default_rng(n).normal(size=(n, 1, *TILE)).astype(np.float32)
        out = engine.run(tiles)
    batches = [tiles[i:i + 3] for i in range(0, n, 3)]
    expected = np.concatenate([network(b) for b in batches])
    np.testing.assert_array_equal(out, expected)
    executes = [line for line in log if line.startswith("execute")]
    assert [int(line.split()[2]) for line in executes] == [len(b) for b in batches]
    assert len({line.split()[-1] for line in executes}) == 1  # every enqueue on the one compute stream
    copies_in = [line.split()[-1] for line in log if line.startswith("htod")]
    assert len(copies_in) == len(batches) and all(a != b for a, b in pairwise(copies_in))  # slots alternate
    assert executes[0].split()[-1] not in copies_in  # copies never on the compute stream
    compute = executes[0].split()[-1]
    waits = [line for line in log if "waits for" in line]
    # per batch: compute waits for its input copy, the copy stream waits for the compute before copying out
    assert sum(w.startswith(compute) for w in waits) == len(batches)
    assert len(waits) == 2 * len(batches)


def test_a_batch_smaller_than_a_fixed_batch_is_padded() -> None:
    from node.infer.gpu.trt_engine import CudaContext, TensorRTEngine

    log: list[str] = []
    with installed(make_tensorrt(network, TILE, 2, TILE, log), make_pycuda(log)):
        engine = TensorRTEngine(b"PLAN", name="fake", input_name="image", output_name="probabilities", max_batch=4,
                                min_batch=4, context=CudaContext(0))
        tiles = np.random.default_rng(1).normal(size=(6, 1, *TILE)).astype(np.float32)
        out = engine.run(tiles)
    np.testing.assert_array_equal(out[:4], network(tiles[:4]))
    np.testing.assert_array_equal(out[4:], network(tiles[4:]))  # the padded tiles' outputs are dropped
    executes = [line for line in log if line.startswith("execute")]
    assert len(executes) == 2 and all(line.startswith("execute batch 4 ") for line in executes)


def test_the_engine_reports_its_shapes() -> None:
    log: list[str] = []
    with installed(make_tensorrt(network, TILE, 2, TILE, log), make_pycuda(log)):
        engine = make_engine(log, max_batch=4)
    assert (engine.tile_shape, engine.output_shape, engine.channels, engine.max_batch) == (TILE, TILE, 2, 4)


def test_wrong_tiles_and_batches_are_refused_with_sentences() -> None:
    log: list[str] = []
    with installed(make_tensorrt(network, TILE, 2, TILE, log), make_pycuda(log)):
        engine = make_engine(log)
        with pytest.raises(InferenceError, match=r"fake: tiles of shape \(1, 4, 6, 9\); the plan takes"):
            engine.run(np.zeros((2, 1, 4, 6, 9), np.float32))
        with pytest.raises(InferenceError, match=r"batch 4 is outside the plan's profile \(1..3\)"):
            engine.enqueue(0, 0, 4, object())


def test_a_plan_that_does_not_deserialise_is_named() -> None:
    from node.infer.gpu.trt_engine import CudaContext, TensorRTEngine

    log: list[str] = []
    with (
        installed(make_tensorrt(network, TILE, 2, TILE, log), make_pycuda(log)),
        pytest.raises(InferenceError, match="TensorRT could not deserialise fake"),
    ):
        TensorRTEngine(b"GARBAGE", name="fake", input_name="image", output_name="probabilities", max_batch=1,
                       context=CudaContext(0))


def test_close_frees_the_device_buffers() -> None:
    log: list[str] = []
    with installed(make_tensorrt(network, TILE, 2, TILE, log), make_pycuda(log)):
        engine = make_engine(log)
        engine.close()
    assert log.count("free") == 4  # two slots, input and output each


def test_the_cuda_context_is_released_once() -> None:
    """pycuda aborts a process whose context stack is not empty at exit: close() pops and detaches,
    once, whether called by the worker or at exit."""
    from node.infer.gpu.trt_engine import CudaContext

    log: list[str] = []
    with installed(make_tensorrt(network, TILE, 2, TILE, log), make_pycuda(log)):
        context = CudaContext(0)
        context.close()
        context.close()
    assert log == ["push", "pop", "detach"]
