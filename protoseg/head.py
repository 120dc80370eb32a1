"""``ProtoSegHead``: the prototype segmentation head of ProtoSeg (docs/spec.md §7, §8).

Forward, on features f [b, C_in, h, w]:

1. project to the embedding (``projection``), ``feat_norm`` LayerNorm, l2-normalise
   → x [N, D], N = b·h·w in (b, y, x) order;
2. class scores s[i, c] = max_k ⟨x_i, P̂_ck⟩ and, when learning, the log-sum-exp over
   all C·K prototypes, from one pass (``class_scores(..., lse_temperature=τ)``);
3. ``mask_norm`` LayerNorm over classes → segmentation logits [b, C, h, w].

In training with labels (after ``warmup_iters`` steps without prototype learning):

4. labels are downsampled to h × w (nearest); correct_i = (argmax logits_i == label_i);
5. Sinkhorn clusters each class's pixels onto its own K prototypes → target
   prototype t_i = c·K + k_i; PPC_i = lse_i − ⟨x_i, P̂_t⟩/τ and PPD_i = (1 − ⟨x_i, P̂_t⟩)²
   from a gathered dot product (N·D work: ``ppc_ppd_loss(..., lse=lse)``), averaged
   over labelled pixels;
6. each prototype moves towards the mean of its assigned, correctly predicted
   pixels by momentum (a buffer, updated without autograd).

So a training step costs three N × D × C·K GEMMs (forward, and in backward a
recomputation and dx) and never holds an N × C × K tensor (on a fused backend).

Differences from the original code, unless ``compat="protoseg"``: the update uses
the Sinkhorn argmax (``assignment="argmax"``, what the paper describes) instead of
a Gumbel draw from the Sinkhorn probabilities, and with a ``process_group`` the
Sinkhorn clustering and the update run on the pixels of all ranks (global
semantics, docs/spec.md §3.4/§3.5) instead of per rank followed by an average of the
ranks' prototypes. PPC/PPD are 0 (not NaN) on a batch without labelled pixels.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import protoseg_kernels as pk

from .labels import check_labels, downsample_labels

ASSIGNMENTS = ("argmax", "gumbel")
COMPAT_MODES = ("protoseg",)
PROJECTIONS = ("mlp", "linear", "none")
UNLABELLED = -1  # target of pixels without a label


class HeadOutput(NamedTuple):
    """What a segmentation head returns.

    ``seg``: logits [b, C, h, w] at feature resolution. ``ppc``/``ppd``: scalar
    losses when prototypes were learned in this forward, else None. ``target``:
    [N] flat prototype index c·K + k of each pixel (-1 unlabelled), or None.
    ``contrast``: the pixel-contrast loss of a contrast head in training, else None.
    ``nodes``: node logits [b, V, h, w] of the HSSN head (leaves first), else None.
    ``tree_min``, ``level_ce``, ``triplet``: the HSSN head's weighted loss terms in training
    (tree-min, the cross-entropies of the internal levels, f(t)·tree-triplet), else None.
    """

    seg: Tensor
    ppc: Tensor | None = None
    ppd: Tensor | None = None
    target: Tensor | None = None
    contrast: Tensor | None = None
    nodes: Tensor | None = None
    tree_min: Tensor | None = None
    level_ce: Tensor | None = None
    triplet: Tensor | None = None

    def __getattr__(self, name: str):  # only reached for names the tuple does not have
        raise AttributeError(
            f"'HeadOutput' is not a tensor (no attribute {name!r}): its logits are .seg, at feature "
            "resolution; protoseg.predict_logits(output, size) upsamples them. A torchvision segmentation "
            "model cannot take a protoseg head as its classifier: see docs/integration.md"
        )


def build_projection(kind: str, in_channels: int, embed_dim: int) -> nn.Module:
    """The original "convmlp" projection (1×1 conv, BN, ReLU, 1×1 conv), one 1×1
    conv, or nothing (``embed_dim`` must then equal ``in_channels``)."""
    if kind == "mlp":
        return nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, embed_dim, 1),
        )
    if kind == "linear":
        return nn.Conv2d(in_channels, embed_dim, 1)
    if embed_dim != in_channels:
        raise ValueError(f"projection='none' needs embed_dim == in_channels ({in_channels}), got {embed_dim}")
    return nn.Identity()


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_non_negative_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_features(features: object) -> Tensor:
    if not isinstance(features, Tensor) or features.dim() != 4:
        got = f"shape {tuple(features.shape)}" if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a [b, C, h, w] tensor, got {got}")
    return features


def _resolve_assignment(assignment: str | None, compat: str | None) -> str:
    if compat is None:
        return _check_choice("assignment", assignment or "argmax", ASSIGNMENTS)
    _check_choice("compat", compat, COMPAT_MODES)
    if assignment not in (None, "gumbel"):
        raise ValueError(f"compat='protoseg' uses the original Gumbel assignment; got assignment={assignment!r}")
    return "gumbel"


class CountsSteps:
    """A head's count of its training forwards with labels, which drives warm-ups and ramps.

    The count is a 0-dim int64 buffer on the head's device (``step_count``), advanced in place:
    a step neither reads a host value nor changes a Python attribute, so ``torch.compile``
    compiles the step once (it specialises on a Python int and would recompile at every step)
    and no GPU waits for the host. ``steps`` reads it (a host read, for inspection). It travels
    in the ``state_dict`` as the int ``{"steps": n}`` (extra state), so a resumed run continues
    warm-ups and ramps at the same step.
    """

    step_count: Tensor

    def _init_step_counter(self) -> None:
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64), persistent=False)

    @property
    def steps(self) -> int:
        return int(self.step_count)

    def _count_step(self) -> Tensor:
        """This step's index (0 for the first training forward), then advances the count."""
        step = self.step_count.clone()
        self.step_count.add_(1)
        return step

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.step_count.fill_(int(state["steps"]))


class ProjectsPixels:
    """A head with a ``projection`` module to ``embed_dim`` channels: its l2-normalised pixel
    embeddings (ContrastiveSeg and HSSN; ProtoSegHead adds a LayerNorm first)."""

    projection: nn.Module
    embed_dim: int

    def embedding_map(self, features: Tensor) -> Tensor:
        """Unit-norm embeddings [b, D, h, w] of features [b, C_in, h, w]."""
        return F.normalize(self.projection(_check_features(features)), dim=1)

    def embed(self, features: Tensor) -> Tensor:
        """Unit-norm pixel embeddings [b·h·w, D] in (b, y, x) order (as ProtoSegHead.embed)."""
        return self.embedding_map(features).permute(0, 2, 3, 1).reshape(-1, self.embed_dim)


class ProtoSegHead(CountsSteps, nn.Module):
    """Nonparametric prototype head: K prototypes per class, cosine similarity,
    Sinkhorn assignment, PPC/PPD losses and a momentum update (ProtoSeg).

    Args:
        in_channels: channels of the backbone's feature map.
        num_classes: C.
        num_prototypes: K prototypes per class.
        embed_dim: D, the embedding (and prototype) dimension; default ``in_channels``.
        projection: ``"mlp"`` (the original projection head), ``"linear"`` or ``"none"``.
        momentum: γ of the prototype update (1 freezes the prototypes).
        temperature: τ of PPC (the original code uses 1; the paper states 0.1).
        sinkhorn_epsilon, sinkhorn_iterations: Sinkhorn's ε and number of iterations.
        assignment: prototype of each pixel for the update: ``"argmax"`` of the
            Sinkhorn assignment (default) or the original ``"gumbel"`` draw.
        compat: ``"protoseg"`` reproduces the original code (Gumbel draw, per-rank
            Sinkhorn and update, then the prototypes averaged across ranks).
        warmup_iters: training forwards with labels that learn no prototypes (PPC and PPD
            exactly 0, targets -1, prototypes unchanged), as the original ``pretrain_prototype``.
        ignore_index: label of unlabelled pixels (-1, ``pk.IGNORE_INDEX``, by default).
        process_group: ranks that share the prototypes under data parallelism
            (e.g. ``torch.distributed.group.WORLD``); None: this process alone.
        validate_labels: check label values once per step (one host synchronisation; with
            ``process_group`` collective, one extra small all-reduce, so all ranks raise).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_prototypes: int = 10,
        embed_dim: int | None = None,
        *,
        projection: str = "mlp",
        momentum: float = 0.999,
        temperature: float = 1.0,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        assignment: str | None = None,
        compat: str | None = None,
        warmup_iters: int = 0,
        ignore_index: int = pk.IGNORE_INDEX,
        process_group: Any | None = None,
        validate_labels: bool = True,
    ) -> None:
        super().__init__()
        in_channels = _check_positive_int("in_channels", in_channels)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.num_prototypes = _check_positive_int("num_prototypes", num_prototypes)
        self.embed_dim = _check_positive_int("embed_dim", in_channels if embed_dim is None else embed_dim)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.temperature = _check_positive_float("temperature", temperature)
        self.sinkhorn_epsilon = _check_positive_float("sinkhorn_epsilon", sinkhorn_epsilon)
        self.sinkhorn_iterations = _check_positive_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
        self.assignment = _resolve_assignment(assignment, compat)
        self.compat = compat
        self.warmup_iters = _check_positive_int("warmup_iters", warmup_iters, minimum=0)
        self.ignore_index = int(ignore_index)
        self.process_group = process_group
        self.validate_labels = bool(validate_labels)
        self._init_step_counter()

        self.projection = build_projection(_check_choice("projection", projection, PROJECTIONS),
                                           in_channels, self.embed_dim)
        self.feat_norm = nn.LayerNorm(self.embed_dim)
        self.mask_norm = nn.LayerNorm(self.num_classes)
        prototypes = torch.empty(self.num_classes, self.num_prototypes, self.embed_dim)
        nn.init.trunc_normal_(prototypes, std=0.02)
        self.register_buffer("prototypes", F.normalize(prototypes, dim=-1))

    def extra_repr(self) -> str:
        mode = f"compat={self.compat!r}" if self.compat else f"assignment={self.assignment!r}"
        return (f"num_classes={self.num_classes}, num_prototypes={self.num_prototypes}, "
                f"embed_dim={self.embed_dim}, momentum={self.momentum}, temperature={self.temperature}, "
                f"{mode}, warmup_iters={self.warmup_iters}")

    def embed(self, features: Tensor) -> Tensor:
        """Unit-norm pixel embeddings x [b·h·w, D] of features [b, C_in, h, w]."""
        _check_features(features)
        embedding = self.projection(features)
        flat = embedding.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        return F.normalize(self.feat_norm(flat), dim=1)

    def forward(
        self, features: Tensor, labels: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> HeadOutput:
        """Segmentation logits, and in training with ``labels`` [b, H, W] the PPC/PPD
        losses and the prototype update. ``generator`` drives the Gumbel draw."""
        batch, _, height, width = _check_features(features).shape
        x = self.embed(features)
        # A normalised copy: the buffer is overwritten by the update below while
        # autograd still holds this tensor for backward. It keeps the buffer's dtype
        # (the ops cast it to x's for the similarities), so the momentum update of
        # an fp32 buffer is not rounded to a low-precision x's dtype.
        prototypes = F.normalize(self.prototypes, dim=-1)
        if not (self.training and labels is not None):
            scores = pk.class_scores(x, prototypes, normalize=False)
            return HeadOutput(self._to_map(self.mask_norm(scores), batch, height, width))
        if self.validate_labels:
            labels = check_labels(labels, batch, self.num_classes, self.ignore_index, self.process_group)
        step = self._count_step()
        scores, lse = pk.class_scores(x, prototypes, normalize=False, lse_temperature=self.temperature)
        seg_flat = self.mask_norm(scores)
        pixel_labels = downsample_labels(labels, (height, width)).reshape(-1)
        correct = seg_flat.detach().argmax(dim=1) == pixel_labels
        # The warm-up is a tensor condition, not a Python branch on the count: the step stays
        # one graph under torch.compile. A warm-up step runs the clustering, keeps the old
        # prototypes and gives every pixel the target -1, so PPC and PPD are exactly 0 there.
        learns = None if self.warmup_iters == 0 else step >= self.warmup_iters
        target = self._learn_prototypes(x.detach(), prototypes, pixel_labels, correct, generator, learns)
        ppc, ppd = self._contrast_losses(x, prototypes, lse, target)
        return HeadOutput(self._to_map(seg_flat, batch, height, width), ppc, ppd, target)

    def _to_map(self, per_pixel: Tensor, batch: int, height: int, width: int) -> Tensor:
        """[b·h·w, C] in (b, y, x) order → [b, C, h, w]."""
        return per_pixel.view(batch, height, width, self.num_classes).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _learn_prototypes(
        self, x: Tensor, prototypes: Tensor, labels: Tensor, correct: Tensor, generator: torch.Generator | None,
        learns: Tensor | None,
    ) -> Tensor:
        """Sinkhorn targets [N] (flat c·K + k, -1 unlabelled); updates the buffer. Where
        ``learns`` (a 0-dim bool) is False, the buffer keeps its value and every target is -1."""
        group = None if self.compat else self.process_group
        gumbel = self.assignment == "gumbel"
        common = {"normalize": False, "ignore_index": self.ignore_index, "process_group": group,
                  "validate": False}
        result = pk.sinkhorn_assign(
            x, prototypes, labels, epsilon=self.sinkhorn_epsilon, iterations=self.sinkhorn_iterations,
            return_q=gumbel, **common,
        )
        update_index = pk.gumbel_index(result.q, generator=generator) if gumbel else result.index
        new_prototypes, _ = pk.update_prototypes(
            prototypes, x, labels, update_index, mask=correct, momentum=self.momentum, **common
        )
        if self.compat and self.process_group is not None:
            # The original code: average the ranks' prototypes, without renormalising.
            new_prototypes = new_prototypes.div_(dist.get_world_size(self.process_group))
            dist.all_reduce(new_prototypes, group=self.process_group)
        assigned = result.index >= 0
        if learns is not None:
            new_prototypes = torch.where(learns, new_prototypes, self.prototypes)
            assigned = assigned & learns
        self.prototypes.copy_(new_prototypes)
        return torch.where(assigned, labels * self.num_prototypes + result.index, UNLABELLED)

    def _contrast_losses(self, x: Tensor, prototypes: Tensor, lse: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """PPC and PPD averaged over labelled pixels (0 with zero gradient if none), from
        the lse of the scores' pass and the gathered target similarity (N·D work)."""
        return pk.ppc_ppd_loss(x, prototypes, target, lse=lse, normalize=False, temperature=self.temperature,
                               ignore_index=UNLABELLED, validate=False)
