"""The ``reference`` backend: readable, vectorised PyTorch on any device.

It is the oracle the other backends are tested against, and the fallback when
no fused backend serves a device. It materialises N×C×K similarities. It implements
every op of the table (:mod:`protoseg_kernels._op_table`), one module ``<op>.py`` each,
in every floating dtype.
"""

from __future__ import annotations

import torch

from .._op_table import FLOAT_DTYPES, collect_python_kernels

IMPLEMENTED = collect_python_kernels(__name__, globals(), FLOAT_DTYPES)


def unavailable_reason() -> str | None:
    return None


def device_reason(device: torch.device) -> str | None:
    return None
