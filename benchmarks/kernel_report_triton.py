"""Kernel-report rows of the Triton backend (see ``kernel_report.py``).

Every Triton kernel is compiled ahead of time, for each target, at exactly the
launches the backend makes at the docs/spec.md §7 presets: each kernel function of the
backend is called on meta tensors of the preset shapes while its launches are
recorded (no GPU, no data), and each distinct launch is specialised the way
Triton's runtime would and compiled with ``triton.compile``. Registers, stack and
local memory are read from the resulting cubin (``cuobjdump --dump-resource-usage``),
tensor-core instructions from its SASS (``cuobjdump -sass``),
spill bytes (for a kernel with a stack frame: spills are stored there) from
``ptxas -v`` on the same PTX with Triton's ptxas flags, and shared memory from the
compiled kernel's metadata. A kernel that calls libdevice (``__nv_*``)
is reported as a problem: the backend must not use it.
"""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

try:  # part of the benchmarks package, or run as a script from its folder
    from . import sass
except ImportError:
    import sass  # type: ignore[no-redef]

# Input dtypes compiled, with torch.backends.cuda.matmul.allow_tf32 (fp32 runs either way).
VARIANTS = ((torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True))
META = torch.device("meta")


def _backend_calls(n: int, d: int, c: int, k: int, dtype: torch.dtype) -> None:
    """Call every kernel function of the backend once per code path, on meta tensors."""
    from protoseg_kernels import triton as tk

    def t(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dt, device=META)

    x, p = t(n, d), t(c, k, d)
    index, labels = t(n, c, dt=torch.int64), t(n, dt=torch.int64)
    g_scores, g_row, lse = t(n, c), t(n, dt=torch.float32), t(n, dt=torch.float32)
    s_grad = t(n, c, k)
    tk.similarity_forward(x, p, True)
    tk.similarity_backward(s_grad, x, p, True, True)
    tk.class_scores_forward(x, p, True, "max", 1.0, 0.1)
    tk.class_scores_forward(x, p, True, "logsumexp", 0.5, None)
    tk.class_scores_backward(g_scores, None, x, p, index, lse, True, "max", 1.0, None, True)
    tk.class_scores_backward(g_scores, g_row, x, p, index, lse, True, "max", 1.0, 0.1, True)
    tk.class_scores_backward(g_scores, None, x, p, index, lse, True, "logsumexp", 0.5, None, True)
    tk.ppc_ppd_forward(x, p, labels, True, 0.1)
    tk.ppc_ppd_backward(g_row, g_row, x, p, labels, lse, True, 0.1, True)
    logits, beta = t(n, k, dt=torch.float32), t(c, k, dt=torch.float32)
    tk.sinkhorn_logits(x, p, labels, True, 0.05)
    tk.sinkhorn_class_logsumexp(logits, labels, c)
    tk.sinkhorn_marginals(logits, labels, beta)
    tk.sinkhorn_finalize(logits, labels, beta, True)
    sums, counts = tk.prototype_sums(x, labels, c * k, True)
    tk.momentum_update(p, sums, counts, 0.999, True)
    _pixel_contrast_calls(t, d, c)
    _tree_min_calls(t)


def _pixel_contrast_calls(t: Any, d: int, c: int) -> None:
    """pixel_contrast_loss: sampled anchors against a labelled bank (constant, and with its
    gradient) and in-batch, both denominators (docs/spec.md §7: A = 1,024; the block sizes
    do not depend on M)."""
    from protoseg_kernels import triton as tk

    a, m = 1024, 2 * c * 5000
    anchors, bank = t(a, d), t(m, d)
    anchor_labels, bank_labels = t(a, dt=torch.int64), t(m, dt=torch.int64)
    g, stats, positives = t(a, dt=torch.float32), t(a, dt=torch.float32), t(a, dt=torch.int64)
    for supcon in (False, True):
        log_b = t(0 if supcon else a, dt=torch.float32)
        for columns, labels, in_batch in ((bank, bank_labels, False), (anchors, anchor_labels, True)):
            tk.pixel_contrast_forward(anchors, anchor_labels, columns, labels, in_batch, True, 0.1, 0.07, supcon)
            for need_contrast_grad in ((False,) if in_batch else (False, True)):
                tk.pixel_contrast_backward(g, anchors, anchor_labels, columns, labels, positives, stats, log_b,
                                           in_batch, True, 0.1, 0.07, supcon, need_contrast_grad)


def _tree_min_calls(t: Any) -> None:
    """tree_min_loss at its docs/spec.md §7 preset, whatever the similarity preset: Cityscapes
    logits [2, 26, 512, 1024] (as the op passes them, [B, V, H·W]) on pk.Hierarchy.cityscapes(),
    without focal weight, with HSSN's γ = 2 (a square) and with another γ (a power)."""
    import protoseg_kernels as pk
    from protoseg_kernels import triton as tk

    hierarchy = pk.Hierarchy.cityscapes()
    tables = hierarchy.tables(META)
    b, p = 2, 512 * 1024
    logits, labels, g = t(b, hierarchy.num_nodes, p), t(b, p, dt=torch.int64), t(b, p, dt=torch.float32)
    weights = tables.node_weights * 5.0
    for gamma in (0.0, 2.0, 1.5):
        tk.tree_min_forward(logits, labels, tables.ancestors, tables.descendants, weights, gamma, 1e-8)
        tk.tree_min_backward(g, logits, labels, tables.ancestors, tables.descendants, weights, gamma, 1e-8)


_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _flat(args: Any) -> list[Any]:
    """Launch arguments with the tuple arguments (rows, columns, an op's tensors) opened."""
    out: list[Any] = []
    for a in args:
        out += _flat(a) if isinstance(a, tuple) else [a]
    return out


def _describe(launch: Any) -> tuple[str, str]:
    """(kernel name, configuration) of a recorded launch: its floating dtypes, block
    sizes, warps (w) and pipeline stages (s), and the flags that are on."""
    tensors = [a for a in _flat(launch.args) if isinstance(a, torch.Tensor)]
    floats = sorted({_SHORT[a.dtype] for a in tensors if a.dtype in _SHORT})
    flags, sizes = [], []
    for key, value in launch.kwargs.items():
        if isinstance(value, bool):
            if value:
                flags.append(key.lower())
        elif hasattr(value, "fn"):  # a jit function passed as a constexpr (the dS of an op)
            flags.append(value.fn.__name__.strip("_"))
        elif key in ("num_warps", "num_stages"):
            sizes.append(f"{'w' if key == 'num_warps' else 's'}{value}")
        elif key == "PRECISION":
            if value != "ieee":
                flags.append(value)
        elif isinstance(value, int):
            sizes.append(f"{key}{value}")
        elif isinstance(value, tuple):  # an op's constexpr flags
            if value:
                flags.append(f"{key.lower()}{','.join(map(str, value))}")
        elif value is not None:  # e.g. the compute dtype of the momentum step
            flags.append(str(value))
    name = launch.kernel.fn.__name__.strip("_").removesuffix("_kernel")
    return name, " ".join(["+".join(floats)] + sizes + flags)


def _recorded_launches(presets: dict[str, tuple[int, int, int, int]]) -> list[tuple[str, str, Any]]:
    from protoseg_kernels.triton import _host

    if _host.INTERPRETING:
        raise RuntimeError("the kernel report compiles kernels: run it without TRITON_INTERPRET=1")
    unique: dict[tuple[str, str], Any] = {}
    for n, d, c, k in presets.values():
        for dtype, tf32 in VARIANTS:
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                with _host.recording_launches() as launches:
                    _backend_calls(n, d, c, k, dtype)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
            for launch in launches:
                unique.setdefault(_describe(launch), launch)
        with _host.recording_launches() as launches:  # float64 prototypes (mixed-precision update)
            from protoseg_kernels import triton as tk

            tk.momentum_update(torch.empty(c, k, d, dtype=torch.float64, device=META),
                               torch.empty(c * k, d, device=META), torch.empty(c * k, dtype=torch.int64, device=META),
                               0.999, True)
        unique.setdefault(_describe(launches[0]), launches[0])
    return [(name, config, launch) for (name, config), launch in unique.items()]


def _compile(launch: Any, capability: int) -> Any:
    """Specialise and compile like Triton's runtime launch would, for ``capability``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tool(name: str) -> str:
    import triton

    return getattr(triton.knobs.nvidia, name).path


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the kernel in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[1]))
    return {key: int(value) for key, value in fields.items()}


def _tensor_core_instructions(cubin: bytes) -> int:
    """Tensor-core instructions in the SASS of a cubin (benchmarks/sass.py)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return sum(sass.tensor_core_instructions(Path(f.name), _tool("cuobjdump")).values())


def _spill_bytes(ptx: str, arch: str) -> int:
    """Spill stores + loads reported by ptxas -v (Triton's own ptxas flags)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                              str(src), "-o", str(Path(tmp) / "kernel.o")], capture_output=True, text=True,
                             check=True).stderr
    return sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


# Launches to compile, set before the worker processes fork (they are not picklable).
_JOBS: list[tuple[str, str, Any, int]] = []


def _row(job_index: int) -> dict:
    name, config, launch, capability = _JOBS[job_index]
    compiled = _compile(launch, capability)
    usage = _resource_usage(compiled.asm["cubin"])
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    stack = usage["STACK"] + usage.get("LOCAL", 0)
    # Spills live in the stack frame: without one there are none, and ptxas need not run again.
    spills = _spill_bytes(compiled.asm["ptx"], arch) if stack else 0
    row = {"kernel": name, "config": config, "target": f"sm_{capability}", "registers": usage["REG"],
           "spills": spills, "stack": stack,
           "shared": compiled.metadata.shared + usage.get("SHARED", 0),
           "tensor_cores": _tensor_core_instructions(compiled.asm["cubin"])}
    if "__nv_" in compiled.asm["llir"]:
        row["problem"] = "calls libdevice"
    return row


def collect(presets: dict[str, tuple[int, int, int, int]], capabilities: list[int]) -> list[dict]:
    _JOBS[:] = [(name, config, launch, cap) for name, config, launch in _recorded_launches(presets)
                for cap in capabilities]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_row, range(len(_JOBS))))
    problems = [dict(row) for row in rows if "problem" in row]
    for row in rows:
        row.pop("problem", None)
    return sorted(rows, key=lambda r: (r["kernel"], r["config"], r["target"])) + problems
