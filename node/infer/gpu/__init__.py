"""GPU inference: the GPU's profile, TensorRT plans and their cache, pycuda buffers and kernels.

Nothing here is imported by a CPU-only node: ``tensorrt``, ``pycuda`` and ``pynvml`` are imported
lazily inside the functions that need them, and :mod:`node.infer.gpu.backend` says why the GPU path is not
available when it is not (then the node runs ONNX Runtime on the CPU).
"""
