"""What a head step is, shared by the naive baseline and the fused implementation.

A step starts from the embedding ``x`` [N, D] (the output of ``feat_norm``) and
labels [N] at feature resolution, and does what ProtoSeg does per training
iteration (docs/spec.md §8): l2-normalise, class scores (max over each class's K
prototypes), ``mask_norm`` LayerNorm, Sinkhorn targets per class, the PPC and
PPD losses, the momentum update of the prototypes from correctly predicted
pixels, and the backward pass of the loss to ``x`` and the ``mask_norm``
parameters. The backbone, ``feat_norm`` and the bilinear upsampling of the
segmentation logits are the same for every implementation and not part of it;
the segmentation cross-entropy is taken at feature resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from .problems import HeadInputs


@dataclass(frozen=True)
class HeadConfig:
    """ProtoSeg's hyper-parameters (its released configs)."""

    momentum: float = 0.999
    epsilon: float = 0.05
    iterations: int = 3
    ppc_weight: float = 0.01
    ppd_weight: float = 0.001
    ppc_temperature: float = 1.0  # the code's value (the paper says 0.1)


DEFAULT_CONFIG = HeadConfig()


class StepOutput(NamedTuple):
    loss: Tensor  # seg_loss + ppc_weight·ppc + ppd_weight·ppd
    seg_loss: Tensor
    ppc: Tensor
    ppd: Tensor
    target: Tensor  # [N] flat target prototype c·K + k of the PPC/PPD losses, -1 ignored
    prototypes: Tensor  # [C, K, D] after the momentum update


StepFn = Callable[[HeadInputs, HeadConfig], StepOutput]


def train_step(step: StepFn, inputs: HeadInputs, config: HeadConfig) -> StepOutput:
    """One full step: forward, Sinkhorn, update, backward (gradients land on ``inputs``)."""
    out = step(inputs, config)
    out.loss.backward()
    return out
