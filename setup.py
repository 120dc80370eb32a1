"""Build protoseg-kernels and its C++/CUDA extension ``protoseg_kernels._C``.

Environment knobs (all optional):

* ``PROTOSEG_FORCE_CUDA=1`` / ``PROTOSEG_SKIP_CUDA=1``: compile the CUDA kernels
  even if no toolkit is detected / never. By default they are compiled when a CUDA
  toolkit and a CUDA build of torch are present (never decided by
  ``torch.cuda.is_available()``: building needs no GPU).
* ``TORCH_CUDA_ARCH_LIST``: defaults to ``8.0;8.6;9.0+PTX`` (torch's own default
  probes the GPU, which fails on a machine without one).
* ``CUDA_HOME``: the toolkit; otherwise found from ``nvcc`` on PATH, looking through
  wrapper scripts to the real installation.
* ``PROTOSEG_CPU_ARCH``: ``-march`` value for the CPU kernels (default ``native``).
* ``PROTOSEG_BUILD_EMULATION=1``: also build ``protoseg_kernels._C_emulated``, the
  CUDA kernel sources compiled for the host (the ``cuda_emulated`` test backend).
* ``MAX_JOBS``: parallel compile jobs (default: at most 2).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _real_nvcc(candidate: str) -> Path | None:
    """Follow symlinks and simple ``exec /path/nvcc "$@"`` wrapper scripts."""
    path = Path(candidate).resolve()
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return None
    if head.startswith(b"\x7fELF"):
        return path
    match = re.search(rb"(/[^\s\"']*/bin/nvcc)\b", head)
    return _real_nvcc(match.group(1).decode()) if match else None


def resolve_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return str(Path(os.environ[var]).resolve())
    nvcc = shutil.which("nvcc")
    real = _real_nvcc(nvcc) if nvcc else None
    if real is not None:
        return str(real.parent.parent)
    default = Path("/usr/local/cuda")
    return str(default.resolve()) if (default / "bin" / "nvcc").exists() else None


# These must be settled before torch.utils.cpp_extension is imported: it reads
# CUDA_HOME at import time.
CUDA_HOME = resolve_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("MAX_JOBS", str(min(2, os.cpu_count() or 1)))
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def build_cuda() -> bool:
    if _flag("PROTOSEG_SKIP_CUDA"):
        return False
    if _flag("PROTOSEG_FORCE_CUDA"):
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def _sources(*patterns: str) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        found += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))
    return found


CPU_ARCH = os.environ.get("PROTOSEG_CPU_ARCH", "native")
# The sources are C++17; the -std flag itself comes from torch.utils.cpp_extension
# (C++20 for recent torch, whose headers need it).
CXX_FLAGS = ["-O3", f"-march={CPU_ARCH}", "-fno-math-errno", "-Wall"]
# The CPU kernels of _C: at::parallel_for is inlined into the extension and only runs in
# parallel when compiled with OpenMP (at run time it uses torch's libgomp, already loaded);
# fused multiply-adds in the epilogues and reductions.
CPU_KERNEL_FLAGS = ["-fopenmp", "-ffp-contract=fast"]
CPU_LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# The CUDA kernel sources built by the host compiler (csrc/emulation): hidden symbols so
# they never interpose on the real extension's, and CUDA's `#pragma unroll` is not GCC's.
EMULATION_FLAGS = ["-DPROTOSEG_EMULATION", "-pthread", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
WITH_CUDA = build_cuda()


def extensions() -> list:
    registration = _sources("csrc/*.cpp")
    if not registration:
        return []
    common = {"include_dirs": [str(CSRC)]}
    exts = []
    if WITH_CUDA:
        exts.append(CUDAExtension(
            "protoseg_kernels._C",
            registration + _sources("csrc/cpu/*.cpp", "csrc/cuda/*.cpp", "csrc/cuda/*.cu"),
            extra_compile_args={"cxx": CXX_FLAGS + CPU_KERNEL_FLAGS + ["-DPROTOSEG_WITH_CUDA"],
                                "nvcc": NVCC_FLAGS + ["-DPROTOSEG_WITH_CUDA"]},
            extra_link_args=CPU_LINK_FLAGS, **common,
        ))
    else:
        exts.append(CppExtension(
            "protoseg_kernels._C", registration + _sources("csrc/cpu/*.cpp"),
            extra_compile_args={"cxx": CXX_FLAGS + CPU_KERNEL_FLAGS}, extra_link_args=CPU_LINK_FLAGS,
            **common,
        ))
    emulation = _sources("csrc/emulation/*.cpp")
    if _flag("PROTOSEG_BUILD_EMULATION") and emulation:
        exts.append(CppExtension(
            "protoseg_kernels._C_emulated", emulation,
            extra_compile_args={"cxx": CXX_FLAGS + EMULATION_FLAGS},
            extra_link_args=["-pthread"], **common,
        ))
    return exts


def _version_line(cmd: list[str], contains: str = "") -> str | None:
    """The first line of ``cmd``'s output that contains ``contains``."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((line.strip() for line in out.splitlines() if contains in line and line.strip()), None)


class BuildWithMetadata(BuildExtension):
    """build_ext that also records how the extension was built (shown by
    ``python -m protoseg_kernels.env``)."""

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        target = Path(self.get_ext_fullpath("protoseg_kernels._C")).parent / "_build_info.json"
        target.write_text(json.dumps(self.metadata(), indent=2) + "\n")

    def metadata(self) -> dict:
        compiler = os.environ.get("CXX", "c++")
        nvcc = str(Path(CUDA_HOME, "bin", "nvcc")) if CUDA_HOME else None
        return {
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
            "torch_cuda": torch.version.cuda,
            "cuda_kernels": WITH_CUDA,
            "cuda_home": CUDA_HOME if WITH_CUDA else None,
            "nvcc": _version_line([nvcc, "--version"], "release") if (WITH_CUDA and nvcc) else None,
            "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if WITH_CUDA else None,
            "compiler": _version_line([compiler, "--version"]),
            "cxx_flags": CXX_FLAGS + CPU_KERNEL_FLAGS,
            "nvcc_flags": NVCC_FLAGS if WITH_CUDA else None,
            "emulation": any(e.name.endswith("_C_emulated") for e in self.extensions),
        }


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildWithMetadata.with_options(use_ninja=True)},
)
