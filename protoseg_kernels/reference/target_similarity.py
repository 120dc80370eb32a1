"""Reference of ``target_similarity`` (the oracle of its tests; docs/spec.md §3.7).

s_i = ⟨x̂_i, P̂_{t_i}⟩ for a valid target, 0 where t_i = -1. Gathers the target
rows in one piece and lets autograd differentiate: readable, N×D memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import prepared


def target_similarity(x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool) -> Tensor:
    """[N] in the compute dtype; ``target`` holds flat indices c·K + k or -1."""
    xs, ps = prepared(x, prototypes, normalize)
    valid = target >= 0
    s = (xs * ps[target.clamp_min(0)]).sum(dim=1)
    return torch.where(valid, s, 0.0)
