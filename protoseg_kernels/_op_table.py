"""The op/kernel table: every public op served by the backends, with its kernels.

This is the one Python list of the kernels (their contract, signatures and docs, is
:mod:`protoseg_kernels._kernel_interface`; their C++ schemas are ``csrc/schemas.h``,
which tests/test_op_inventory.py checks against this table). Everything else reads it:
the compiled-backend binder, the Python backends' kernel collection, backend selection
(``resolve_backend(op, device, dtype)``), ``python -m protoseg_kernels.env`` and the tests.

A backend implements an op when it has all of the op's kernels, and says in which input
dtypes (:class:`Implemented`): the Python backends (``reference``, ``triton``) by having
a module ``<backend package>/<op>.py`` that defines them, the compiled ones by what the
loaded extension registered for their dispatch key. Ops without kernels (portable torch
code on every device, such as ``gumbel_index``) are not listed.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# Short dtype names, for messages and the env table.
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class Kernel:
    """One kernel of the contract: ``torch.ops.protoseg_kernels.<name>`` in the compiled
    extension, a function ``<name>`` in every backend module."""

    name: str
    # The last output is d_prototypes, which the compiled kernels return as an empty tensor
    # when ``need_prototype_grad`` (the last argument) is False; the contract says None.
    prototype_grad: bool = False


@dataclass(frozen=True)
class Op:
    """A public op (``pk.<name>``, ``torch.ops.protoseg.<name>``) and the kernels it runs."""

    name: str
    spec: str  # its section of the contract (docs/spec.md §N)
    kernels: tuple[Kernel, ...]


OPS: tuple[Op, ...] = (
    Op("prototype_similarity", "docs/spec.md §3.1", (
        Kernel("similarity_forward"), Kernel("similarity_backward", prototype_grad=True))),
    Op("class_scores", "docs/spec.md §3.2", (
        Kernel("class_scores_forward"), Kernel("class_scores_backward", prototype_grad=True))),
    Op("ppc_ppd_loss", "docs/spec.md §3.3", (
        Kernel("ppc_ppd_forward"), Kernel("ppc_ppd_backward", prototype_grad=True))),
    Op("sinkhorn_assign", "docs/spec.md §3.4", (
        Kernel("sinkhorn_logits"), Kernel("sinkhorn_class_logsumexp"), Kernel("sinkhorn_marginals"),
        Kernel("sinkhorn_finalize"))),
    Op("update_prototypes", "docs/spec.md §3.5", (Kernel("prototype_sums"), Kernel("momentum_update"))),
    Op("pixel_contrast_loss", "docs/spec.md §10.1", (
        Kernel("pixel_contrast_forward"), Kernel("pixel_contrast_backward", prototype_grad=True))),
    Op("tree_min_loss", "docs/spec.md §11.1", (Kernel("tree_min_forward"), Kernel("tree_min_backward"))),
)

OPS_BY_NAME: Mapping[str, Op] = {op.name: op for op in OPS}
KERNELS: Mapping[str, Kernel] = {kernel.name: kernel for op in OPS for kernel in op.kernels}


def get_op(name: str) -> Op:
    """The table entry of public op ``name``."""
    try:
        return OPS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"{name!r} is not an op of the table; ops: {', '.join(OPS_BY_NAME)}") from None


@dataclass(frozen=True)
class Implemented:
    """What one backend implements.

    ``dtypes``: op name -> the input dtypes it computes the op in, for every op whose
    kernels it has all of. ``missing``: op name -> the kernels it lacks, for every op it
    has only some kernels of (never served: a missing kernel shows instead of failing
    halfway through an op).
    """

    dtypes: Mapping[str, frozenset[torch.dtype]] = field(default_factory=dict)
    missing: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def implemented_from(present: set[str], dtypes: frozenset[torch.dtype]) -> Implemented:
    """Declaration of a backend that has the kernels named in ``present``, each in ``dtypes``."""
    served: dict[str, frozenset[torch.dtype]] = {}
    missing: dict[str, tuple[str, ...]] = {}
    for op in OPS:
        lacking = tuple(k.name for k in op.kernels if k.name not in present)
        if not lacking:
            served[op.name] = dtypes
        elif len(lacking) < len(op.kernels):
            missing[op.name] = lacking
    return Implemented(served, missing)


def collect_python_kernels(package: str, namespace: dict[str, Any], dtypes: frozenset[torch.dtype]) -> Implemented:
    """Bind into ``namespace`` (a backend package's globals) the kernels of every op the
    package has a module ``<package>.<op>`` for, and declare those ops in ``dtypes``.

    A module that fails to import raises: a broken backend must not look like one that
    merely lacks the op.
    """
    present: set[str] = set()
    for op in OPS:
        if importlib.util.find_spec(f"{package}.{op.name}") is None:
            continue
        module = importlib.import_module(f"{package}.{op.name}")
        for kernel in op.kernels:
            function = getattr(module, kernel.name, None)
            if callable(function):
                namespace[kernel.name] = function
                present.add(kernel.name)
    return implemented_from(present, dtypes)
