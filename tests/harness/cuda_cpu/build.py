"""Compile node/infer/gpu/kernels.cu with g++ through cuda_cpu.h into a shared library and load it with ctypes.

For every kernel of ``node.infer.gpu.kernels.SIGNATURES`` the generated host code has an
``extern "C" void launch_<kernel>(unsigned grid, unsigned block, <the kernel's parameters>)`` that runs
the launch as a serial loop (cuda_cpu.h), and a ``static_assert`` that kernels.cu declares exactly the
parameter types of the table: the table the pycuda launches are packed from is checked by the compiler.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from node.infer.gpu.kernels import KERNELS_CU, SIGNATURES

HERE = Path(__file__).resolve().parent
FLAGS = ["-O2", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra"]

_CTYPES = {"long long": ctypes.c_longlong, "int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double}


def ctype(c_type: str) -> type:
    return ctypes.c_void_p if c_type.endswith("*") else _CTYPES[c_type]


def host_source() -> str:
    lines = ['#include "cuda_cpu.h"', f'#include "{KERNELS_CU}"', "#include <type_traits>", ""]
    for name, types in SIGNATURES.items():
        lines.append(f"static_assert(std::is_same<decltype(&{name}), void (*)({', '.join(types)})>::value,")
        lines.append(f'              "{name}: kernels.cu and node.infer.gpu.kernels.SIGNATURES disagree");')
        params = ", ".join(f"{'void*' if t.endswith('*') else t} a{i}" for i, t in enumerate(types))
        args = ", ".join(f"({t})a{i}" if t.endswith("*") else f"a{i}" for i, t in enumerate(types))
        lines.append(f'extern "C" void launch_{name}(unsigned grid, unsigned block, {params}) {{')
        lines.append(f"    cpu_launch(dim3(grid), dim3(block), [&] {{ {name}({args}); }});")
        lines.append("}")
        lines.append("")
    return "\n".join(lines)


@dataclass
class Built:
    lib: ctypes.CDLL
    warnings: str  # g++'s stderr: empty when kernels.cu compiles cleanly with -Wall -Wextra


def missing_reason() -> str | None:
    return None if shutil.which("g++") else "g++ is not installed (apt-get install g++)"


def build(out_dir: Path) -> Built:
    """Compile into ``out_dir``; every ``launch_<kernel>`` gets its ctypes signature."""
    source = out_dir / "kernels_cpu.cpp"
    library = out_dir / "libkernels_cpu.so"
    source.write_text(host_source())
    proc = subprocess.run(["g++", *FLAGS, f"-I{HERE}", str(source), "-o", str(library)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ could not compile {KERNELS_CU.name} through cuda_cpu.h:\n{proc.stderr}")
    lib = ctypes.CDLL(str(library))
    for name, types in SIGNATURES.items():
        function = getattr(lib, f"launch_{name}")
        function.argtypes = [ctypes.c_uint, ctypes.c_uint, *(ctype(t) for t in types)]
        function.restype = None
    return Built(lib=lib, warnings=proc.stderr)
