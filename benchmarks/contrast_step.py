"""ContrastiveSeg training-step rows (docs/spec.md §12): hard-anchor sampling, the pixel-contrast
loss, the memory-bank update and backward, fused against the original code.

Both steps start from the same tensors at ContrastiveSeg's Cityscapes settings: the
projection's output ``embedding`` [B = 2, D = 256, 64, 128] (two 512×1024 crops at 1/8), a
leaf requiring grad, which the step normalises over channels (``F.normalize``, differentiable,
as the projection head does); segmentation logits [2, 19, 64, 128], whose argmax is the
prediction; labels at that resolution with long-tailed class frequencies and 10% ignored
(``ignore_index`` −1), pixels in raster order. Variants (docs/spec.md §12):

* ``bank``: τ = τ_b = 0.07, max_samples 1024, max_views 1, against a memory bank of
  L = 5,000 entries per queue (M = 2·19·5,000 = 190,000), 10 pixels per class and image;
* ``in_batch``: τ = 0.1, τ_b = 0.07, max_samples 1024, max_views 100, no bank.

The bank starts full, as after the 5,000 warm-up steps of cross-entropy alone: every slot
holds a random unit vector labelled with its class (the original's initial bank,
``protoseg.contrast_compat.original_fill``), then a few random batches are enqueued. All of
it happens before the timed steps, the same for every implementation (same seed). The sizes
are the same on a CPU and a GPU: at max_views 1 the bank variant has at most 2·19 anchors, so
its A×M logits fit everywhere, and each step takes well under a second on 2 cores.

* **fused** (each protoseg backend): ``pk.sample_anchors(..., validate=False)``, the anchors
  of its first min(max_samples, B·C·max_views) slots (a static bound on the filled ones:
  the bank variant's loss sees 38 rows, not 1,024 mostly padding) gathered from the
  normalised embedding without copying it, ``pk.pixel_contrast_loss(..., validate=False)``
  (the loss's backend is the row's), backward, then ``bank.enqueue(..., validate=False)``:
  after backward, because the fused loss rereads the bank in backward.
* **naive** (the baseline): the original's ``_hard_anchor_sampling`` as it is written (per
  image and class: ``unique``, ``nonzero``, a CPU ``randperm``, the n_view / 2 rules, X_
  [classes, n_view, D] filled row by row), its ``_sample_negative`` (the bank copied class
  by class into one contrast matrix), the dense loss of
  :func:`benchmarks.contrast_baseline.contrastive_loss`, the original bank update
  (``protoseg.contrast_compat.original_enqueue``, its loops and bugs) after the loss and
  before backward, as the original trainer does, then backward.

Deviations of the naive step from the original, each needed for it to compute the loss the
fused step computes (so that the rows compare like with like): the contrast set takes the
bank's slot labels (the original labels every slot of class c with c, the same in a full
bank) and keeps class 0 (the original's ``_sample_negative`` skips it and leaves zero rows
labelled 0); the loss is the one of ``contrastive_loss`` (its own deviations are in its
module). The labels come at feature resolution in both steps (the original downsamples the
full-resolution target first, the same work for both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import protoseg_kernels as pk
from protoseg.contrast_compat import original_enqueue, original_fill

from .contrast_baseline import contrastive_loss
from .measure import Case
from .problems import IGNORE_INDEX, Problem, _long_tailed_labels

OP = "contrast_step"
MODE = "step"
BANK, IN_BATCH = "bank", "in_batch"
PREFILL_BATCHES = 3
# How far a labelled pixel's logit of its own class is raised above the others' (noise std 1):
# about 85% of the labelled pixels are predicted right at 19 classes, and every class keeps
# some hard (mispredicted) pixels, a few classes fewer than half their anchors' worth.
LOGIT_MARGIN = 3.0

# (image, candidate positions [k, 1]) -> the order in which the candidates are kept
Order = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class StepSettings:
    """One ContrastiveSeg step: sizes and hyper-parameters (docs/spec.md §12)."""

    name: str
    variant: str  # BANK or IN_BATCH
    temperature: float
    base_temperature: float
    max_views: int
    max_samples: int = 1024
    batch: int = 2
    height: int = 64
    width: int = 128
    dim: int = 256
    classes: int = 19
    bank_size: int = 5_000  # L, per queue and class (bank only)
    pixels_per_class: int = 10

    @property
    def bank_entries(self) -> int:
        return 2 * self.classes * self.bank_size if self.variant == BANK else 0

    @property
    def problem(self) -> Problem:
        """The result rows' problem: N = B·h·w pixels, M = 2·C·L bank entries."""
        return Problem(self.name, n=self.batch * self.height * self.width, d=self.dim, c=self.classes,
                       k=0, m=self.bank_entries)

    @property
    def label(self) -> str:
        shape = f"{self.batch}x{self.dim}x{self.height}x{self.width}"
        return f"{self.variant} {shape}" + (f" M={self.bank_entries}" if self.variant == BANK else "")


SETTINGS = {s.name: s for s in (
    StepSettings("step_bank", BANK, temperature=0.07, base_temperature=0.07, max_views=1),
    StepSettings("step_in_batch", IN_BATCH, temperature=0.1, base_temperature=0.07, max_views=100),
    # The smoke suite's: 2 images of 12×24, D = 16, 4 classes, L = 16.
    StepSettings("tiny_step_bank", BANK, temperature=0.07, base_temperature=0.07, max_views=1,
                 max_samples=64, height=12, width=24, dim=16, classes=4, bank_size=16, pixels_per_class=3),
    StepSettings("tiny_step_in_batch", IN_BATCH, temperature=0.1, base_temperature=0.07, max_views=8,
                 max_samples=64, height=12, width=24, dim=16, classes=4),
)}
PRESETS = ("step_bank", "step_in_batch")
TINY = ("tiny_step_bank", "tiny_step_in_batch")


def problems(names: tuple[str, ...] = PRESETS) -> tuple[Problem, ...]:
    return tuple(SETTINGS[name].problem for name in names)


def settings_of(p: Problem) -> StepSettings:
    s = SETTINGS[p.name]
    if s.problem != p:
        raise ValueError(f"{p} is not the step {s.name!r} ({s.problem})")
    return s


def label_of(p: Problem) -> str:
    return SETTINGS[p.name].label if p.name in SETTINGS else p.label


# ---- inputs ------------------------------------------------------------------
@dataclass
class StepInputs:
    embedding: Tensor  # [B, D, h, w], the projection's output, leaf requiring grad
    logits: Tensor  # [B, C, h, w]
    labels: Tensor  # [B, h, w] int64, IGNORE_INDEX where ignored
    bank: pk.ClassMemoryBank | None

    def clear(self) -> None:
        self.embedding.grad = None


def _batch(s: StepSettings, g: torch.Generator, centres: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(embedding, logits, labels) of one batch, on the CPU: each pixel's embedding near its
    class's centre (cosine about 0.7; ignored pixels near a random class's)."""
    n = s.batch * s.height * s.width
    labels = _long_tailed_labels(n, s.classes, g)
    centre = torch.where(labels >= 0, labels, torch.randint(0, s.classes, (n,), generator=g))
    pixels = centres[centre] + torch.randn(n, s.dim, generator=g) / math.sqrt(s.dim)
    embedding = pixels.view(s.batch, s.height, s.width, s.dim).permute(0, 3, 1, 2).contiguous()
    logits = torch.randn(n, s.classes, generator=g)
    labelled = (labels >= 0).nonzero().squeeze(1)
    logits[labelled, labels[labelled]] += LOGIT_MARGIN
    logits = logits.view(s.batch, s.height, s.width, s.classes).permute(0, 3, 1, 2).contiguous()
    return embedding, logits, labels.view(s.batch, s.height, s.width)


def make_inputs(s: StepSettings, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StepInputs:
    """The step's tensors; for the bank variant, a full bank after ``PREFILL_BATCHES`` enqueues."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(s.classes, s.dim, generator=g), dim=1)
    embedding, logits, labels = _batch(s, g, centres)
    bank = None
    if s.variant == BANK:
        bank = pk.ClassMemoryBank(s.classes, s.bank_size, s.dim, ignore_index=IGNORE_INDEX, dtype=dtype,
                                  device=device)
        original_fill(bank, generator=g)
        draws = torch.Generator(device=device).manual_seed(seed + 1)
        for _ in range(PREFILL_BATCHES):
            x, _, y = _batch(s, g, centres)
            bank.enqueue(F.normalize(x, dim=1).to(device=device, dtype=dtype), y.to(device),
                         pixels_per_class=s.pixels_per_class, generator=draws)
    return StepInputs(
        embedding=embedding.to(device=device, dtype=dtype).requires_grad_(),
        logits=logits.to(device=device, dtype=dtype),
        labels=labels.to(device),
        bank=bank,
    )


# ---- the fused step ------------------------------------------------------------
def fused_step(o: StepInputs, s: StepSettings, priority: Tensor | None = None) -> Tensor:
    """Sampling, loss and backward with the public ops, then the bank update; the loss.
    ``priority`` [B, h·w] fixes the sampling (default: uniform random)."""
    embedding = F.normalize(o.embedding, dim=1)
    batch, dim = embedding.shape[:2]
    labels = o.labels.view(batch, -1)
    prediction = o.logits.argmax(dim=1).view(batch, -1)
    sample = pk.sample_anchors(labels, prediction, max_samples=s.max_samples, max_views=s.max_views,
                               ignore_index=IGNORE_INDEX, priority=priority, validate=False)
    # At most T·V ≤ B·C·max_views slots are filled, first: a static bound, so the loss need
    # not see the padding (at max_views 1, 38 rows of 1,024).
    bound = min(s.max_samples, batch * o.logits.shape[1] * s.max_views)
    index, anchor_labels = sample.index[:bound], sample.labels[:bound]
    pixels = embedding.view(batch, dim, -1)  # [B, D, n], no copy
    index = index.clamp_min(0)  # padding rows read pixel 0 and are labelled ignored
    anchors = pixels[index // pixels.shape[2], :, index % pixels.shape[2]]  # [A, D]
    contrast, contrast_labels = o.bank.contrast_set() if o.bank is not None else (None, None)
    loss = pk.pixel_contrast_loss(anchors, anchor_labels, contrast, contrast_labels,
                                  temperature=s.temperature, base_temperature=s.base_temperature,
                                  normalize=False, ignore_index=IGNORE_INDEX, validate=False)
    loss.backward()
    if o.bank is not None:
        o.bank.enqueue(embedding.detach(), o.labels, pixels_per_class=s.pixels_per_class, validate=False)
    return loss.detach()


# ---- the naive step (the original code) ----------------------------------------
def hard_anchor_sampling(X: Tensor, y_hat: Tensor, y: Tensor, max_samples: int, max_views: int,
                         ignore_label: int = IGNORE_INDEX, order: Order | None = None
                         ) -> tuple[Tensor | None, Tensor | None]:
    """The original ``_hard_anchor_sampling``: X [B, n, D], y_hat the labels and y the
    predictions [B, n]. Returns X_ [classes, n_view, D] and y_ [classes] (float), or
    (None, None) without a qualifying class. ``order(image, candidates)`` replaces the CPU
    ``randperm`` of the candidates (for the tests)."""
    batch_size, feat_dim = X.shape[0], X.shape[-1]

    classes = []
    total_classes = 0
    for ii in range(batch_size):
        this_y = y_hat[ii]
        this_classes = torch.unique(this_y)
        this_classes = [x for x in this_classes if x != ignore_label]
        this_classes = [x for x in this_classes if (this_y == x).nonzero().shape[0] > max_views]

        classes.append(this_classes)
        total_classes += len(this_classes)

    if total_classes == 0:
        return None, None

    n_view = max_samples // total_classes
    n_view = min(n_view, max_views)

    X_ = torch.zeros((total_classes, n_view, feat_dim), dtype=torch.float, device=X.device)
    y_ = torch.zeros(total_classes, dtype=torch.float, device=X.device)

    X_ptr = 0
    for ii in range(batch_size):
        this_y_hat = y_hat[ii]
        this_y = y[ii]
        this_classes = classes[ii]

        for cls_id in this_classes:
            hard_indices = ((this_y_hat == cls_id) & (this_y != cls_id)).nonzero()
            easy_indices = ((this_y_hat == cls_id) & (this_y == cls_id)).nonzero()

            num_hard = hard_indices.shape[0]
            num_easy = easy_indices.shape[0]

            if num_hard >= n_view / 2 and num_easy >= n_view / 2:
                num_hard_keep = n_view // 2
                num_easy_keep = n_view - num_hard_keep
            elif num_hard >= n_view / 2:
                num_easy_keep = num_easy
                num_hard_keep = n_view - num_easy_keep
            elif num_easy >= n_view / 2:
                num_hard_keep = num_hard
                num_easy_keep = n_view - num_hard_keep
            else:
                raise Exception(f"this should be never touched! {num_hard} {num_easy} {n_view}")

            perm = torch.randperm(num_hard) if order is None else order(ii, hard_indices)
            hard_indices = hard_indices[perm[:num_hard_keep]]
            perm = torch.randperm(num_easy) if order is None else order(ii, easy_indices)
            easy_indices = easy_indices[perm[:num_easy_keep]]
            indices = torch.cat((hard_indices, easy_indices), dim=0)

            X_[X_ptr, :, :] = X[ii, indices, :].squeeze(1)
            y_[X_ptr] = cls_id
            X_ptr += 1

    return X_, y_


def sample_negative(bank: pk.ClassMemoryBank) -> tuple[Tensor, Tensor]:
    """The original ``_sample_negative`` of ``queue = cat((segment_queue, pixel_queue), 1)``:
    the queues copied class by class into X_ [C·2L, D], labels y_ [C·2L, 1] (float)."""
    Q = torch.cat((bank.features[0], bank.features[1]), dim=1)
    Q_labels = torch.cat((bank.labels[0], bank.labels[1]), dim=1)
    class_num, cache_size, feat_size = Q.shape

    X_ = torch.zeros((class_num * cache_size, feat_size), dtype=torch.float, device=Q.device)
    y_ = torch.zeros((class_num * cache_size, 1), dtype=torch.float, device=Q.device)
    sample_ptr = 0
    for ii in range(class_num):
        this_q = Q[ii, :cache_size, :]

        X_[sample_ptr:sample_ptr + cache_size, ...] = this_q
        y_[sample_ptr:sample_ptr + cache_size, 0] = Q_labels[ii]
        sample_ptr += cache_size

    return X_, y_


def naive_step(o: StepInputs, s: StepSettings, order: Order | None = None) -> Tensor:
    """The original step: sampling, contrast set, dense loss, bank update, backward; the loss."""
    embed = F.normalize(o.embedding, p=2, dim=1)
    _, predict = torch.max(o.logits, 1)
    batch_size = embed.shape[0]
    labels = o.labels.contiguous().view(batch_size, -1)
    predict = predict.contiguous().view(batch_size, -1)
    feats = embed.permute(0, 2, 3, 1)
    feats = feats.contiguous().view(feats.shape[0], -1, feats.shape[-1])

    X_anchor, y_anchor = hard_anchor_sampling(feats, labels, predict, s.max_samples, s.max_views, order=order)
    if X_anchor is None:
        loss = embed.sum() * 0
    else:
        anchor_feature = torch.cat(torch.unbind(X_anchor, dim=1), dim=0)  # view-major, as the original
        anchor_labels = y_anchor.repeat(X_anchor.shape[1])
        X_contrast, y_contrast = sample_negative(o.bank) if o.bank is not None else (None, None)
        loss = contrastive_loss(anchor_feature, anchor_labels, X_contrast, y_contrast,
                                temperature=s.temperature, base_temperature=s.base_temperature,
                                normalize=False, ignore_index=IGNORE_INDEX)
    if o.bank is not None:
        original_enqueue(o.bank, embed.detach(), o.labels, s.pixels_per_class)
    loss.backward()
    return loss.detach()


# ---- cases -----------------------------------------------------------------------
def step_case(o: StepInputs, s: StepSettings, backend: str | None) -> Case:
    """One whole step on ``backend``, or the naive step (None)."""

    def run(_: None) -> None:
        if backend is None:
            naive_step(o, s)
        else:
            with pk.use_backend(backend):
                fused_step(o, s)

    return Case(prepare=o.clear, run=run)


def cases(backend: str | None, p: Problem, device: torch.device, dtype: torch.dtype,
          seed: int) -> list[tuple[str, str, Case]]:
    """(op, mode, case) of one job's row."""
    s = settings_of(p)
    return [(OP, MODE, step_case(make_inputs(s, device, dtype, seed), s, backend))]
