"""``gumbel_index``: the original ProtoSeg update assignment (docs/spec.md §3.6), kept for
compatibility.

The original code draws ``F.gumbel_softmax(q, tau=0.5, hard=True)`` with the
Sinkhorn *probabilities* q as logits, i.e. argmax_k(q_ik + g_ik) with g i.i.d.
Gumbel(0, 1). Since q_ik ∈ [0, 1] is small next to the Gumbel noise, with K = 10
this agrees with argmax q on only about 20% of pixels, which drags every
prototype of a class towards the class mean. Use it only to reproduce that code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_float_tensor

OP = "gumbel_index"


def gumbel_index(q: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """argmax_k(q_ik + g_ik), g ~ Gumbel(0, 1) i.i.d.; -1 for all-zero rows.

    Args:
        q: [N, K] Sinkhorn probabilities (zero rows for ignored pixels).
        generator: random generator (the global one when None). The noise is
            drawn as ``-log(Exponential(1))``, as ``F.gumbel_softmax`` does, so the
            same generator state gives the same draw as the original code.

    Returns:
        index [N] int64.
    """
    q = check_float_tensor(OP, "q", q, 2, "[N, K]")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{OP}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    gumbels = -torch.empty_like(q).exponential_(generator=generator).log()
    index = (q + gumbels).argmax(dim=1)
    return torch.where((q != 0).any(dim=1), index, -1)
