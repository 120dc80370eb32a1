"""Which implementations a benchmark compares, and how each builds its cases.

* ``baseline``: the naive step (:mod:`benchmarks.baseline`), eager.
* ``baseline_compiled``: ``torch.compile`` of the same function (default mode;
  the data-dependent class loop splits it into several graphs, as it would in a
  user's model).
* one per ``protoseg_kernels`` backend that serves the device natively:
  ``reference``, ``cpu`` on CPU; ``reference``, ``triton``, ``cuda`` on CUDA. Each
  runs :func:`benchmarks.head_step.fused_step`, the head step composed from the
  public ops only (what a user writes; 3 similarity GEMMs per step).
  (``cuda_emulated`` and interpreted Triton exist for the tests, not for speed.)
* ``gemm_floor``: the bare GEMMs of the floor (:mod:`benchmarks.flops`).
* ``cpu@<level>`` (``--cpu-levels``): the ``cpu`` backend with its kernels of one
  instruction-set level (protoseg_kernels/_compiled/cpu_levels.py), its worker process
  started with ``PROTOSEG_CPU_CAPABILITY=<level>``: the levels timed in alternation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

import protoseg_kernels as pk
from protoseg_kernels._backend import get_backend, unavailable_reason

from . import op_cases
from .baseline import baseline_step, l2_normalize
from .flops import GEMM_DX, GEMM_FWD, HEAD_FLOOR
from .head_step import fused_step
from .measure import Case
from .problems import HeadInputs
from .step import HeadConfig, StepFn, train_step

BASELINE = "baseline"
COMPILED = "baseline_compiled"
FLOOR = "gemm_floor"
BACKENDS_BY_DEVICE = {"cpu": ("reference", "cpu"), "cuda": ("reference", "triton", "cuda")}

DISPLAY_NAMES = {
    BASELINE: "baseline (naive)",
    COMPILED: "torch.compile(baseline)",
    FLOOR: "GEMM floor",
}


def display_name(impl: str) -> str:
    return DISPLAY_NAMES.get(impl, f"protoseg [{impl}]")


def backend_status(device: torch.device) -> dict[str, str | None]:
    """For each backend benchmarked on ``device``: None if usable, else why not."""
    status: dict[str, str | None] = {}
    for name in BACKENDS_BY_DEVICE.get(device.type, ("reference",)):
        reason = unavailable_reason(name)
        status[name] = reason if reason else get_backend(name).device_reason(device)
    return status


def usable_backends(device: torch.device) -> list[str]:
    return [name for name, reason in backend_status(device).items() if reason is None]


LEVEL_SEPARATOR = "@"


def is_backend(impl: str) -> bool:
    return impl not in (BASELINE, COMPILED, FLOOR)


def backend_of(impl: str) -> str | None:
    """The protoseg backend an implementation runs (None for the baselines and the floor)."""
    return impl.split(LEVEL_SEPARATOR)[0] if is_backend(impl) else None


def cpu_level_of(impl: str) -> str | None:
    """The CPU kernel level a ``cpu@<level>`` implementation asks for, else None."""
    backend, _, level = impl.partition(LEVEL_SEPARATOR)
    return level if backend == "cpu" and level else None


def with_cpu_levels(backends: list[str], levels: list[str]) -> list[str]:
    """``backends`` with ``cpu`` replaced by one ``cpu@<level>`` per level."""
    out: list[str] = []
    for name in backends:
        out += [f"cpu{LEVEL_SEPARATOR}{level}" for level in levels] if name == "cpu" and levels else [name]
    return out


def _backend_scope(impl: str) -> contextlib.AbstractContextManager:
    backend = backend_of(impl)
    return pk.use_backend(backend) if backend else contextlib.nullcontext()


def head_step_fn(impl: str) -> StepFn:
    if impl == BASELINE:
        return baseline_step
    if impl == COMPILED:
        return torch.compile(baseline_step)
    return fused_step


def head_case(impl: str, inputs: HeadInputs, config: HeadConfig) -> Case:
    step = head_step_fn(impl)

    def run(_: None) -> None:
        with _backend_scope(impl):
            train_step(step, inputs, config)

    return Case(prepare=inputs.zero_grad, run=run)


def op_case(impl: str, op: str, mode: str, o: op_cases.OpInputs, config: HeadConfig) -> Case:
    """Case of one op in one mode: "fwd", "bwd" (after an untimed forward) or "fwd+bwd"."""
    forward = op_cases.forward_fn(op, naive=not is_backend(impl), config=config)

    def scoped(fn: Callable[[], object]) -> object:
        with _backend_scope(impl):
            return fn()

    def clear() -> None:
        o.x_hat.grad = None

    if mode == "fwd":
        return Case(prepare=clear, run=lambda _: scoped(lambda: forward(o)))
    if mode == "bwd":
        def prepare() -> torch.Tensor:
            clear()
            return scoped(lambda: forward(o))

        return Case(prepare=prepare, run=lambda out: scoped(lambda: op_cases.backward(op, o, out)))
    if mode == "fwd+bwd":
        return Case(prepare=clear, run=lambda _: scoped(lambda: op_cases.backward(op, o, forward(o))))
    raise ValueError(f"unknown mode {mode!r}")


def floor_cases(inputs: HeadInputs) -> dict[str, Case]:
    """The bare GEMMs, writing into preallocated outputs."""
    x_hat = l2_normalize(inputs.x.detach())
    flat = inputs.prototypes.detach().reshape(-1, x_hat.shape[1])
    s = x_hat.new_empty(x_hat.shape[0], flat.shape[0])
    grad_s = torch.randn_like(s)
    grad_x = torch.empty_like(x_hat)

    def fwd(_: None) -> None:
        torch.mm(x_hat, flat.t(), out=s)

    def dx(_: None) -> None:
        torch.mm(grad_s, flat, out=grad_x)

    def three(_: None) -> None:
        fwd(None)
        fwd(None)
        dx(None)

    return {
        GEMM_FWD: Case(prepare=lambda: None, run=fwd),
        GEMM_DX: Case(prepare=lambda: None, run=dx),
        HEAD_FLOOR: Case(prepare=lambda: None, run=three),
    }
