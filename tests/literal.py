"""Literal float64 implementations of docs/spec.md §3, written straight from the text with
plain loops over pixels and classes. Slow on purpose: they are the oracle for the
reference backend, which in turn is the oracle for the fused backends."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12
F64 = torch.float64


def unit(v: Tensor) -> Tensor:
    return v / v.norm().clamp_min(EPS)


def similarity(x: Tensor, prototypes: Tensor, normalize: bool = True) -> Tensor:
    """S[i, c, k] = <x̂_i, P̂_ck>, one pixel at a time; differentiable (for gradcheck)."""
    n = x.shape[0]
    c, k, d = prototypes.shape
    flat = prototypes.to(F64).reshape(c * k, d)
    if normalize:
        flat = torch.stack([unit(p) for p in flat]) if c * k else flat
    rows = []
    for i in range(n):
        xi = x[i].to(F64)
        if normalize:
            xi = xi / xi.norm().clamp_min(EPS)
        rows.append(flat @ xi)
    if not rows:
        return x.new_zeros((0, c, k), dtype=F64)
    return torch.stack(rows).reshape(n, c, k)


def class_scores(s: Tensor, reduction: str, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    n, c, k = s.shape
    scores = torch.zeros(n, c, dtype=F64)
    index = torch.zeros(n, c, dtype=torch.int64)
    for i in range(n):
        for cls in range(c):
            row = [float(v) for v in s[i, cls]]
            best = max(row)
            index[i, cls] = row.index(best)  # first maximum
            if reduction == "max":
                scores[i, cls] = best
            else:
                scores[i, cls] = temperature * torch.logsumexp(s[i, cls] / temperature, 0)
    return scores, index


def logsumexp_all(s: Tensor, temperature: float) -> Tensor:
    n = s.shape[0]
    out = torch.zeros(n, dtype=F64)
    for i in range(n):
        row = s[i].reshape(-1) / temperature
        m = row.max()
        out[i] = m + torch.log(torch.exp(row - m).sum())
    return out


def ppc_ppd(s: Tensor, target: Tensor, temperature: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-pixel losses (0 at ignored pixels) and the validity mask."""
    n = s.shape[0]
    flat = s.reshape(n, s.shape[1] * s.shape[2])
    ppc = torch.zeros(n, dtype=F64)
    ppd = torch.zeros(n, dtype=F64)
    for i in range(n):
        t = int(target[i])
        if t == ignore_index or not 0 <= t < flat.shape[1]:
            continue
        row = flat[i] / temperature
        ppc[i] = torch.logsumexp(row, 0) - flat[i, t] / temperature
        ppd[i] = (1 - flat[i, t]) ** 2
    return ppc, ppd


def sinkhorn_matrix(
    s: Tensor, labels: Tensor, epsilon: float, iterations: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """The original matrix Sinkhorn-Knopp, one class at a time (docs/spec.md §3.4)."""
    n, c, k = s.shape
    index = torch.full((n,), -1, dtype=torch.int64)
    q = torch.zeros(n, k, dtype=F64)
    for cls in range(c):
        members = [i for i in range(n) if int(labels[i]) == cls and int(labels[i]) != ignore_index]
        if not members:
            continue
        z = s[members, cls, :]
        e = torch.exp(z / epsilon).T  # K x n_c
        e = e / e.sum()
        n_c = len(members)
        for _ in range(iterations):
            e = e / e.sum(dim=1, keepdim=True) / k
            e = e / e.sum(dim=0, keepdim=True) / n_c
        qc = (n_c * e).T
        for row, i in enumerate(members):
            index[i] = int(qc[row].argmax())
            q[i] = qc[row]
    return index, q


def update(
    prototypes: Tensor, x: Tensor, labels: Tensor, index: Tensor, mask: Tensor | None,
    momentum: float, ignore_index: int,
) -> tuple[Tensor, Tensor]:
    c, k, d = prototypes.shape
    sums = torch.zeros(c, k, d, dtype=F64)
    counts = torch.zeros(c, k, dtype=torch.int64)
    for i in range(x.shape[0]):
        lab, j = int(labels[i]), int(index[i])
        if lab == ignore_index or not 0 <= lab < c or not 0 <= j < k:
            continue
        if mask is not None and not bool(mask[i]):
            continue
        sums[lab, j] += unit(x[i].to(F64))
        counts[lab, j] += 1
    new = torch.zeros(c, k, d, dtype=F64)
    for cls in range(c):
        for j in range(k):
            p = unit(prototypes[cls, j].to(F64))
            if counts[cls, j] > 0:
                p = unit(momentum * p + (1 - momentum) * unit(sums[cls, j]))
            new[cls, j] = p
    return new, counts
