"""Resource usage of every CUDA kernel of ``csrc/cuda`` (docs/spec.md §6), for the kernel report.

Each ``.cu`` file is compiled to a cubin per target with ``nvcc -Xptxas=-v`` and the same
flags as the extension build (no GPU needed); every kernel entry, i.e. every template
instantiation, becomes one row: registers per thread, spill stores + loads (bytes),
stack frame and static shared memory (bytes), and its tensor-core instructions in the
SASS (``cuobjdump -sass``, benchmarks/sass.py). Zero spills is the bar, and every
tensor-core instantiation (config ``.../tc``) of the GEMM-work kernels of the column
engine (``GEMM_KERNELS``) must contain tensor-core instructions on every target.

    python -m benchmarks.kernel_report_cuda [--targets 80,90]

prints these rows alone; ``python -m benchmarks.kernel_report`` (run by ``make test``)
collects them with the Triton kernels' through :func:`collect`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:  # part of the benchmarks package, or run as a script from its folder
    from . import sass
except ImportError:
    import sass  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# The device flags of setup.py (NVCC_FLAGS and -DPROTOSEG_WITH_CUDA; -lineinfo does not
# change code generation).
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-DPROTOSEG_WITH_CUDA", "-std=c++20"]
STATIC_SHARED_LIMIT = 48 * 1024  # bytes a block may declare statically
ELEMENT_TYPES = {"__half": "fp16", "__nv_bfloat16": "bf16", "double": "fp64", "float": "fp32"}
# The kernels that do GEMM work (the column engine: csrc/cuda/similarity_*.cuh); the
# TileMath template argument says which arithmetic an instantiation runs.
GEMM_KERNELS = ("similarity_sweep_kernel", "similarity_kernel", "grad_x_kernel", "grad_c_kernel")
TILE_MATHS = {"0": "fma", "1": "tc"}
_TILE_MATH = re.compile(r"^\(TileMath\)(\d)$")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")


def find_nvcc() -> str | None:
    return sass.find_toolkit_binary("nvcc")


def compile_flags() -> list[str]:
    import torch
    from torch.utils import cpp_extension

    # torch's headers (nvcc adds the toolkit's own), the sources, Python's.
    includes = [str(CSRC), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    return NVCC_FLAGS + common + [abi] + [f"-I{path}" for path in includes]


def parse_ptxas(log: str) -> list[dict]:
    """One dict per kernel entry of a ``ptxas -v`` log (device functions are skipped)."""
    rows: dict[str, dict] = {}
    current: dict | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            rows[m.group(1)] = {"mangled": m.group(1), "target": m.group(2), "spills": 0, "stack": 0, "shared": 0}
            current = None
        elif m := _PROPERTIES.search(line):
            current = rows.get(m.group(1))
        elif current is not None and (m := _FRAME.search(line)):
            current["stack"] = int(m.group(1))
            current["spills"] = int(m.group(2)) + int(m.group(3))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            shared = _SHARED.search(line)
            current["shared"] = int(shared.group(1)) if shared else 0
            current = None
    return list(rows.values())


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "<(":
            depth += 1
        elif char in ">)":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _parameter_list(name: str) -> int:
    """Where the function's parameter list starts: the first "(" outside template brackets
    (a non-type template argument such as ``(TileMath)1`` has parentheses of its own)."""
    depth = 0
    for i, char in enumerate(name):
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        elif char == "(" and depth == 0:
            return i
    return len(name)


def describe(demangled: str) -> tuple[str, str]:
    """('grad_p_kernel<PpcPpdGradient>', 'bf16') from a demangled kernel signature: the
    kernel with its non-type template arguments, and the element type it runs on."""
    name = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    name = name.replace("protoseg::cuda::", "").replace("protoseg::", "")
    name = name[: _parameter_list(name)]
    if "<" not in name:
        return name, "-"
    base, args = name[: name.index("<")], name[name.index("<") + 1 : name.rindex(">")]
    parts = _split_top_level(args)
    maths = [TILE_MATHS[m.group(1)] for a in parts if (m := _TILE_MATH.match(a))]
    others = [re.sub(r"<.*>", "", a) for a in parts if a not in ELEMENT_TYPES and not _TILE_MATH.match(a)]
    found = [short for full, short in ELEMENT_TYPES.items() if re.search(rf"\b{full}\b", args)]
    element = found[0] if found else "-"  # half types first, then fp64, then fp32
    config = element + (f"/{maths[0]}" if maths else "")
    return base + (f"<{', '.join(others)}>" if others else ""), config


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _compile(nvcc: str, flags: list[str], source: Path, capability: int, scratch: Path,
             cuobjdump: str | None) -> tuple[str, dict[str, int] | None]:
    """The ptxas report of one source for one target, and the tensor-core instructions
    per kernel of the cubin (None without cuobjdump)."""
    cubin = scratch / f"{source.stem}.sm_{capability}.cubin"
    cmd = [nvcc, "--cubin", f"-arch=sm_{capability}", "-Xptxas=-v", *flags, str(source), "-o", str(cubin)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for sm_{capability}:\n{result.stderr[-4000:]}")
    counts = sass.tensor_core_instructions(cubin, cuobjdump) if cuobjdump else None
    return result.stderr, counts  # ptxas writes its report to stderr


def gemm_problems(rows: list[dict]) -> list[dict]:
    """Problem rows for the tensor-core check: a ``/tc`` instantiation of a GEMM kernel
    without tensor-core instructions, or a GEMM kernel with no ``/tc`` instantiation for
    one of fp16, bf16 and fp32 on a target."""
    problems = []
    for row in rows:
        gemm = row["kernel"].split("<")[0] in GEMM_KERNELS
        if gemm and row["config"].endswith("/tc") and row.get("tensor_cores") == 0:
            problems.append({**row, "problem": "a tensor-core instantiation without tensor-core instructions"})
    for kernel in sorted({r["kernel"] for r in rows if r["kernel"].split("<")[0] in GEMM_KERNELS}):
        for target in sorted({r["target"] for r in rows}):
            have = {r["config"] for r in rows if r["kernel"] == kernel and r["target"] == target}
            for element in ("fp16", "bf16", "fp32"):
                if f"{element}/tc" not in have:
                    problems.append({"kernel": kernel, "config": f"{element}/tc", "target": target,
                                     "problem": "no tensor-core instantiation"})
    return problems


def collect(presets: dict | None = None, capabilities: list[int] | tuple[int, ...] = (80, 90)) -> list[dict]:
    """Rows (kernel, config = element type, target, registers, spills, stack, shared) of
    every kernel of csrc/cuda for each compute capability. ``presets`` is accepted for the
    report's interface: CUDA tile sizes are compile-time constants, not per preset."""
    del presets
    nvcc = find_nvcc()
    if nvcc is None:
        return [{"kernel": "csrc/cuda", "config": "-", "target": "-", "problem": "nvcc not found (set CUDA_HOME)"}]
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    flags = compile_flags()
    cuobjdump = sass.find_cuobjdump()
    jobs = int(os.environ.get("MAX_JOBS", "2"))
    jobs_list = [(source, capability) for source in sources for capability in capabilities]
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda job: _compile(nvcc, flags, job[0], job[1], Path(scratch), cuobjdump),
                                jobs_list))
    # Kernels defined in shared headers are compiled into several files: report each once.
    entries = list({(e["mangled"], e["target"]): e for log, _ in results for e in parse_ptxas(log)}.values())
    tensor_cores = {}  # (mangled name, target) -> tensor-core instructions
    for (_, capability), (_, counts) in zip(jobs_list, results):
        for name, count in (counts or {}).items():
            tensor_cores[(name, f"sm_{capability}")] = count
    rows = []
    for entry, demangled in zip(entries, _demangle([e["mangled"] for e in entries])):
        kernel, config = describe(demangled)
        row = {"kernel": kernel, "config": config, "target": entry["target"], "registers": entry["registers"],
               "spills": entry["spills"], "stack": entry["stack"], "shared": entry["shared"],
               "tensor_cores": tensor_cores.get((entry["mangled"], entry["target"]), "?")}
        if row["shared"] > STATIC_SHARED_LIMIT:
            row["problem"] = f"{row['shared']} bytes of static shared memory exceed the 48 KiB limit"
        rows.append(row)
    rows += gemm_problems(rows)
    if cuobjdump is None:
        rows.append({"kernel": "csrc/cuda", "config": "-", "target": "-",
                     "problem": "cuobjdump not found (CUDA_HOME/bin, PATH or Triton's copy): no tensor-core count"})
    return sorted(rows, key=lambda r: (r["kernel"], r["config"], r["target"]))


def main(argv: list[str] | None = None) -> int:
    """The CUDA part of the kernel report alone."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    args = parser.parse_args(argv)
    rows = collect(None, [int(t) for t in args.targets.split(",") if t.strip()])
    report = importlib.import_module(f"{__package__}.kernel_report" if __package__ else "kernel_report")
    problems = [r for r in rows if r.get("problem")]
    kernels = [r for r in rows if not r.get("problem")]
    print(report.format_table(kernels))
    for row in problems:
        print(f"PROBLEM: {row['kernel']} [{row['config']}] on {row['target']}: {row['problem']}")
    spilling = [r for r in kernels if r["spills"]]
    print(f"{len(kernels)} CUDA kernels, {len(spilling)} spilling, {len(problems)} problems")
    return 1 if spilling or problems else 0


if __name__ == "__main__":
    sys.exit(main())
