"""The ``reference`` backend: readable, vectorised PyTorch on any device.

It is the oracle the other backends are tested against, and the fallback when
no fused backend serves a device. It materialises N×C×K similarities.
"""

from __future__ import annotations

import torch

from .class_scores import class_scores_backward, class_scores_forward
from .pixel_contrast_loss import pixel_contrast_backward, pixel_contrast_forward
from .ppc_ppd_loss import ppc_ppd_backward, ppc_ppd_forward
from .prototype_similarity import similarity_backward, similarity_forward
from .sinkhorn_assign import (
    sinkhorn_class_logsumexp,
    sinkhorn_finalize,
    sinkhorn_logits,
    sinkhorn_marginals,
)
from .update_prototypes import momentum_update, prototype_sums

__all__ = [
    "class_scores_backward", "class_scores_forward", "device_reason", "momentum_update",
    "ppc_ppd_backward", "ppc_ppd_forward", "prototype_sums", "similarity_backward",
    "similarity_forward", "sinkhorn_class_logsumexp", "sinkhorn_finalize", "sinkhorn_logits",
    "sinkhorn_marginals", "unavailable_reason",
    "pixel_contrast_backward", "pixel_contrast_forward",
]


def unavailable_reason() -> str | None:
    return None


def device_reason(device: torch.device) -> str | None:
    return None
