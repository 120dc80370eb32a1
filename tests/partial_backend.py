"""A backend that implements only part of the op table, for the selection and inventory
tests: the reference's kernels, except that it has none of sinkhorn_assign's (it does
not implement that op) and lacks momentum_update (it has update_prototypes only in part)."""

from __future__ import annotations

import torch

from protoseg_kernels import reference
from protoseg_kernels._op_table import FLOAT_DTYPES, KERNELS, get_op, implemented_from

NOT_IMPLEMENTED = "sinkhorn_assign"
PARTIAL = "update_prototypes"
LACKING = "momentum_update"

_absent = {k.name for k in get_op(NOT_IMPLEMENTED).kernels} | {LACKING}
for _name in set(KERNELS) - _absent:
    globals()[_name] = getattr(reference, _name)
IMPLEMENTED = implemented_from(set(KERNELS) - _absent, FLOAT_DTYPES - {torch.float64})


def unavailable_reason() -> str | None:
    return None


def device_reason(device: torch.device) -> str | None:
    return None
