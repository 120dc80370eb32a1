"""Build protoseg-kernels and its C++/CUDA extension ``protoseg_kernels._C``.

Environment knobs (all optional):

* ``PROTOSEG_FORCE_CUDA=1`` / ``PROTOSEG_SKIP_CUDA=1``: compile the CUDA kernels
  even if no toolkit is detected / never. By default they are compiled when a CUDA
  toolkit and a CUDA build of torch are present (never decided by
  ``torch.cuda.is_available()``: building needs no GPU).
* ``TORCH_CUDA_ARCH_LIST``: defaults to ``8.0;8.6;9.0+PTX`` (torch's own default
  probes the GPU, which fails on a machine without one); compute capability 8.0 or newer
  (the tensor-core kernels use bf16 and tf32 fragments). setup.py turns it into the
  ``-gencode`` flags itself: torch adds none once any nvcc flag mentions an arch, as the
  host compiler's ``-march`` does.
* ``CUDA_HOME``: the toolkit; otherwise found from ``nvcc`` on PATH, looking through
  wrapper scripts to the real installation.
* ``PROTOSEG_CPU_ARCH``: by default the CPU kernels are compiled once per instruction-set
  level (baseline, AVX2, AVX-512 on x86-64; protoseg_kernels/_compiled/cpu_levels.py) into
  ``protoseg_kernels._cpu_<level>``, and the best one the CPU runs is loaded at run time;
  ``PROTOSEG_CPU_ARCH=native`` (or any ``-march`` value) builds one ``custom`` level with
  that ``-march`` instead: faster to build, for this machine only. The rest of the
  extension is always compiled for the baseline (``-march=x86-64`` on x86-64).
* ``PROTOSEG_BUILD_EMULATION=1``: also build ``protoseg_kernels._C_emulated``, the
  CUDA kernel sources compiled for the host (the ``cuda_emulated`` test backend): every
  ``csrc/cuda/*.cu`` file, with no file of its own to add for it.
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


def _cpu_levels_module():
    """protoseg_kernels/_compiled/cpu_levels.py, read by path (the package is not importable
    before it is built): the one list of levels that the build and the loader share."""
    import importlib.util
    import sys

    path = ROOT / "protoseg_kernels" / "_compiled" / "cpu_levels.py"
    spec = importlib.util.spec_from_file_location("protoseg_cpu_levels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_LEVELS_MODULE = _cpu_levels_module()
CPU_LEVELS = _LEVELS_MODULE.build_levels(os.environ.get("PROTOSEG_CPU_ARCH", "").strip() or None)
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


# The sources are C++17; the -std flag itself comes from torch.utils.cpp_extension
# (C++20 for recent torch, whose headers need it). Everything is compiled for the baseline
# target (spelled out on x86-64, as some compilers default to a newer one) except the CPU
# kernel modules of the higher levels (CPU_LEVELS), which the loader only picks on a CPU
# that runs them.
BASELINE_TARGET = ["-march=x86-64"] if _LEVELS_MODULE.is_x86_64() else []
CXX_FLAGS = ["-O3", "-fno-math-errno", "-Wall"] + BASELINE_TARGET
# The CPU kernel modules: at::parallel_for is inlined into the extension and only runs in
# parallel when compiled with OpenMP (at run time it uses torch's libgomp, already loaded);
# fused multiply-adds in the epilogues and reductions. Hidden symbols: a level module's
# copies of inline header functions (compiled for its instructions) bind inside it and
# never stand in for another module's.
CPU_KERNEL_FLAGS = ["-fopenmp", "-ffp-contract=fast", "-fvisibility=hidden"]
CPU_LINK_FLAGS = ["-fopenmp"]
MIN_CUDA_CAPABILITY = (8, 0)


def cuda_gencode_flags(arch_list: str) -> list[str]:
    """``-gencode`` flags for a TORCH_CUDA_ARCH_LIST such as ``8.0;8.6;9.0+PTX`` (``;``, ``,``
    or spaces between entries): SASS for each entry, PTX too for one marked ``+PTX``."""
    flags = []
    for entry in re.split(r"[;, ]+", arch_list.strip()):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", entry)
        if match is None:
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST: cannot read {entry!r}; expected entries like 8.0, 9.0a or 9.0+PTX")
        major, minor, suffix, ptx = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
        if (major, minor) < MIN_CUDA_CAPABILITY:
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST: {entry} is below compute capability 8.0, which the tensor-core "
                             "kernels need (bf16 and tf32 fragments); use 8.0 or newer")
        code = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    if not flags:
        raise SystemExit("TORCH_CUDA_ARCH_LIST is empty; set compute capabilities such as 8.0;9.0")
    return flags


NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + [f"-Xcompiler={f}" for f in BASELINE_TARGET]
# The CUDA kernel sources built by the host compiler (emulation_sources): hidden symbols so
# they never interpose on the real extension's, and CUDA's `#pragma unroll` is not GCC's.
EMULATION_FLAGS = ["-DPROTOSEG_EMULATION", "-pthread", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
WITH_CUDA = build_cuda()


def _write_if_changed(target: Path, text: str) -> str:
    """Write a generated source only when it changes (rebuilds stay incremental); its path."""
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return str(target.relative_to(ROOT))


def _including(folder: Path, sources: list[str], name_of, what: str) -> list[str]:
    """For each csrc source, a generated one-line source under ``folder`` that includes it,
    named ``name_of(path relative to csrc)``: so that the same source can be compiled in
    several ways, each with object paths of its own; a new source needs no file of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for source in sources:
        relative = Path(source).relative_to("csrc")
        text = f'// Generated by setup.py: {what} of csrc/{relative}.\n#include "{relative}"\n'
        out.append(_write_if_changed(folder / name_of(relative), text))
    return out


def emulation_sources() -> list[str]:
    """The host build of csrc/ops.cpp and of every csrc/cuda/*.cu, as C++ sources (the
    compiler would take a ``.cu`` for CUDA). A name unlike the included file's, so that the
    include cannot find the generated file itself."""
    return _including(ROOT / "build" / "emulation", _sources("csrc/ops.cpp", "csrc/cuda/*.cu"),
                      lambda rel: f"{rel.stem}_{rel.suffix[1:]}_emulated.cpp", "the host emulation build")


def cpu_level_sources(level_name: str) -> list[str]:
    """The csrc/cpu/*.cpp sources of one CPU kernel level, and the module's init function."""
    folder = ROOT / "build" / "cpu_levels" / level_name
    sources = _including(folder, _sources("csrc/cpu/*.cpp"), lambda rel: f"{rel.stem}_{level_name}.cpp",
                         f"CPU kernel level {level_name}")
    text = (f"// Generated by setup.py: the module protoseg_kernels._cpu_{level_name}; its kernels register\n"
            f"// themselves when it loads.\n#include <Python.h>\n\nPyMODINIT_FUNC PyInit__cpu_{level_name}(void) {{\n"
            f"  static PyModuleDef module = {{PyModuleDef_HEAD_INIT, \"_cpu_{level_name}\", nullptr, -1, nullptr}};\n"
            f"  return PyModule_Create(&module);\n}}\n")
    return sources + [_write_if_changed(folder / f"module_{level_name}.cpp", text)]


def extensions() -> list:
    registration = _sources("csrc/*.cpp")
    if not registration:
        return []
    common = {"include_dirs": [str(CSRC)]}
    exts = []
    if WITH_CUDA:
        exts.append(CUDAExtension(
            "protoseg_kernels._C", registration + _sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu"),
            extra_compile_args={"cxx": CXX_FLAGS + ["-DPROTOSEG_WITH_CUDA"],
                                "nvcc": NVCC_FLAGS + ["-DPROTOSEG_WITH_CUDA"]
                                + cuda_gencode_flags(os.environ["TORCH_CUDA_ARCH_LIST"])},
            **common,
        ))
    else:
        exts.append(CppExtension("protoseg_kernels._C", registration,
                                 extra_compile_args={"cxx": CXX_FLAGS}, **common))
    for level in CPU_LEVELS:
        exts.append(CppExtension(
            f"protoseg_kernels.{level.module}", cpu_level_sources(level.name),
            extra_compile_args={"cxx": CXX_FLAGS + CPU_KERNEL_FLAGS + list(level.compile_flags)},
            extra_link_args=CPU_LINK_FLAGS, **common,
        ))
    if _flag("PROTOSEG_BUILD_EMULATION"):
        # Test-only (never in a wheel): compiled for this machine, so the emulated CUDA
        # kernels run at the speed the test suite needs.
        exts.append(CppExtension(
            "protoseg_kernels._C_emulated", emulation_sources(),
            extra_compile_args={"cxx": CXX_FLAGS + ["-march=native"] + EMULATION_FLAGS},
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
            "cxx_flags": CXX_FLAGS,
            "cpu_levels": {level.name: CPU_KERNEL_FLAGS + list(level.compile_flags) for level in CPU_LEVELS},
            "nvcc_flags": NVCC_FLAGS if WITH_CUDA else None,
            "emulation": any(e.name.endswith("_C_emulated") for e in self.extensions),
        }


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildWithMetadata.with_options(use_ninja=True)},
)
