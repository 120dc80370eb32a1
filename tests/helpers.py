"""Input generation and comparison rules of docs/spec.md §5 shared by the test files."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64

# (N, D, C, K): ragged shapes of docs/spec.md §5.
RAGGED_SHAPES = [(1031, 77, 19, 10), (257, 33, 7, 1), (301, 29, 1, 6), (0, 16, 5, 3)]
SMALL_SHAPES = [(67, 13, 5, 4), (40, 9, 3, 1), (35, 11, 1, 5), (0, 8, 3, 2)]


@dataclass
class Case:
    x: Tensor
    prototypes: Tensor
    labels: Tensor  # class per pixel, -1 ignored; one class absent, one with a single pixel
    target: Tensor  # flat prototype per pixel, -1 ignored
    index: Tensor  # prototype within the class, -1 ignored

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, d = self.x.shape
        c, k, _ = self.prototypes.shape
        return n, d, c, k


def make_case(
    n: int, d: int, c: int, k: int, *, seed: int = 0, dtype: torch.dtype = F64,
    ignore_fraction: float = 0.15, peaked_fraction: float = 0.2,
) -> Case:
    """Random inputs with ignored pixels, an absent class, a one-pixel class and
    pixels lying close to a prototype (peaked similarities)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(c, k, d, generator=g, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64) * (0.5 + torch.rand(n, 1, generator=g, dtype=F64))
    labels = torch.randint(0, c, (n,), generator=g)
    if c >= 3 and n > 0:
        labels[labels == c - 1] = 0  # class c-1 absent
        labels[labels == c - 2] = 0
        labels[torch.randint(0, n, (1,), generator=g)] = c - 2  # class c-2 has one pixel
    index = torch.randint(0, k, (n,), generator=g)
    peaked = torch.rand(n, generator=g) < peaked_fraction
    near = prototypes[labels, index] * 3 + 0.3 * torch.randn(n, d, generator=g, dtype=F64)
    x = torch.where(peaked.unsqueeze(1), near, x)
    ignored = torch.rand(n, generator=g) < ignore_fraction
    labels = torch.where(ignored, -1, labels)
    index = torch.where(ignored, -1, index)
    target = torch.where(ignored, -1, labels * k + index)
    return Case(x.to(dtype), prototypes.to(dtype), labels, target, index)


def relative_error(out: Tensor, ref: Tensor) -> float:
    out, ref = out.detach().to(F64), ref.detach().to(F64)
    if not torch.isfinite(out).all():
        return math.inf  # NaN or inf never passes
    denom = float(ref.detach().norm())
    diff = float((out - ref).detach().norm())
    return diff if denom == 0 else diff / denom


def assert_close(out: Tensor, ref: Tensor, tol: float, what: str = "output") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = relative_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def max_abs_difference(a: Tensor, b: Tensor) -> float:
    return float((a.detach().to(F64) - b.detach().to(F64)).abs().amax()) if a.numel() else 0.0


def top2_gap(values: Tensor) -> Tensor:
    """Gap between the largest and second largest entry along the last dim (inf if K = 1)."""
    if values.shape[-1] < 2:
        return torch.full(values.shape[:-1], math.inf, dtype=F64, device=values.device)
    top = values.to(F64).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def assert_index_match(out: Tensor, ref: Tensor, gap: Tensor, tol: float, what: str = "index") -> None:
    """Indices agree except where the top-two gap is within ``tol``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bad = (out != ref) & (gap > tol)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} of {out.numel()} indices differ beyond ties"


def assert_bitwise_equal(a: Tensor | None, b: Tensor | None, what: str = "output") -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one result is None"
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: dtype/shape differ"
    assert torch.equal(a.view(-1).view(torch.uint8) if a.is_floating_point() else a,
                       b.view(-1).view(torch.uint8) if b.is_floating_point() else b), f"{what}: not bitwise identical"


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made by any op while ``fn`` runs
    (including the ops inside our custom ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)
