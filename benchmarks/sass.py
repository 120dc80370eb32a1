"""Tensor-core instructions in compiled GPU code, for the kernel report.

``cuobjdump -sass`` disassembles a cubin; the instructions counted are the matrix
multiply-accumulates of the tensor cores: ``HMMA`` (fp16/bf16/tf32 inputs, what
``nvcuda::wmma`` and Triton's ``tl.dot`` compile to on sm_80 and, for wmma, sm_90),
``HGMMA`` (sm_90 warpgroup MMA), ``IMMA``/``DMMA``/``BMMA`` (integer, fp64, binary).
``HFMA2.MMA`` is a plain half2 FMA that merely runs on the MMA pipe and is not counted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
# An instruction line: /*0a40*/  [@P0 ]MNEMONIC.MODIFIERS operands ;
_TENSOR_CORE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?(?:HMMA|HGMMA|IMMA|DMMA|BMMA)(?:\.|\s)")


def find_toolkit_binary(name: str) -> str | None:
    """A CUDA toolkit program: under CUDA_HOME or CUDA_PATH, on PATH, or in /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / name).exists():
            return str(Path(os.environ[var]) / "bin" / name)
    default = Path("/usr/local/cuda/bin") / name
    return shutil.which(name) or (str(default) if default.exists() else None)


def find_cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the copy Triton ships (a minimal toolkit has none)."""
    found = find_toolkit_binary("cuobjdump")
    if found:
        return found
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    bundled = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def count_tensor_core_instructions(sass: str) -> dict[str, int]:
    """Mangled function name -> tensor-core instructions, from ``cuobjdump -sass`` text."""
    counts: dict[str, int] = {}
    current = None
    for line in sass.splitlines():
        if m := _FUNCTION.match(line):
            current = m.group(1)
            counts.setdefault(current, 0)
        elif current is not None and _TENSOR_CORE.match(line):
            counts[current] += 1
    return counts


def tensor_core_instructions(cubin: Path, cuobjdump: str) -> dict[str, int]:
    """Per-function tensor-core instruction counts of a cubin file."""
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return count_tensor_core_instructions(sass)
