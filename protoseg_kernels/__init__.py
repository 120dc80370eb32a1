"""Fused kernels for prototype-based semantic segmentation (ProtoSeg, CVPR 2022).

Public ops (docs/spec.md §3), each a ``torch.library`` custom op in namespace ``protoseg``
with fake implementations and autograd:

* :func:`prototype_similarity` — S [N, C, K]
* :func:`class_scores` — max (or logsumexp) over each class's K prototypes, plus
  an optional log-sum-exp over all C·K prototypes
* :func:`ppc_ppd_loss` — the PPC and PPD losses (with ``lse=`` from
  :func:`class_scores`: the 3-GEMM training head)
* :func:`target_similarity` — each pixel's similarity to its target prototype
* :func:`sinkhorn_assign` — per-class Sinkhorn clustering, all classes at once
* :func:`update_prototypes` — momentum update of the prototypes
* :func:`gumbel_index` — the original code's Gumbel assignment (compatibility)
* :func:`pixel_contrast_loss` — ContrastiveSeg's supervised pixel contrast (in-batch or
  against a memory bank)
* :func:`sample_anchors` — ContrastiveSeg's hard-anchor sampling, fixed-size, on the device
* :class:`ClassMemoryBank` — ContrastiveSeg's per-class segment and pixel queues
* :class:`Hierarchy` — a class tree (HSSN), with :func:`tree_min_loss`,
  :func:`tree_triplet_loss`, :func:`hierarchy_predict` and :func:`hierarchy_scores`

Backends: ``reference``, ``cpu``, ``triton``, ``cuda`` (see
:func:`available_backends`, :func:`backend_for`, :func:`use_backend` and ``$PROTOSEG_BACKEND``).
"""

from ._backend import BackendFallbackWarning, available_backends, backend_for, use_backend
from ._checks import IGNORE_INDEX
from .class_memory_bank import ClassMemoryBank
from .class_scores import (
    ScoresWithIndex,
    ScoresWithIndexAndLse,
    ScoresWithLse,
    class_scores,
)
from .gumbel_index import gumbel_index
from .hierarchy import Hierarchy
from .hierarchy_predict import hierarchy_predict, hierarchy_scores
from .pixel_contrast_loss import pixel_contrast_loss
from .ppc_ppd_loss import PpcPpdLoss, ppc_ppd_loss
from .prototype_similarity import prototype_similarity
from .sample_anchors import AnchorSample, sample_anchors
from .sinkhorn_assign import SinkhornResult, sinkhorn_assign
from .target_similarity import target_similarity
from .tree_min_loss import tree_min_loss
from .tree_triplet_loss import tree_triplet_loss
from .update_prototypes import PrototypeUpdate, update_prototypes

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "AnchorSample",
    "BackendFallbackWarning",
    "ClassMemoryBank",
    "Hierarchy",
    "PpcPpdLoss",
    "PrototypeUpdate",
    "ScoresWithIndex",
    "ScoresWithIndexAndLse",
    "ScoresWithLse",
    "SinkhornResult",
    "available_backends",
    "backend_for",
    "class_scores",
    "gumbel_index",
    "hierarchy_predict",
    "hierarchy_scores",
    "pixel_contrast_loss",
    "ppc_ppd_loss",
    "prototype_similarity",
    "sample_anchors",
    "sinkhorn_assign",
    "target_similarity",
    "tree_min_loss",
    "tree_triplet_loss",
    "update_prototypes",
    "use_backend",
]
