"""Figures (matplotlib, PNG): what the prototypes learned and how training went.

* :func:`plot_similarity_maps`: for images containing a class, the cosine
  similarity of every pixel to each of that class's K prototypes, and which
  prototype each pixel of the class is closest to (the paper's Fig. 3);
* :func:`plot_embedding_projection`: a 2-D PCA projection of pixel embeddings and
  prototypes of a few classes (the paper's Fig. 5; a contrast head has no prototypes:
  its pixel embeddings only);
* :func:`plot_training_curves`: losses and validation mIoU of one or more runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import Dataset

import protoseg_kernels as pk

from .contrast_head import ContrastHead
from .data.transforms import denormalize_image
from .head import ProtoSegHead
from .hssn_head import HSSNHead
from .labels import downsample_labels
from .model import SegmentationModel

# Figures are drawn on matplotlib.figure.Figure objects (not pyplot), so they render
# off-screen without touching the caller's matplotlib backend or global state.
CLASS_COLOURS = colormaps["tab10"]


def _head(model: SegmentationModel, kinds: tuple[type, ...] = (ProtoSegHead,)) -> ProtoSegHead | ContrastHead:
    if not isinstance(model.head, kinds):
        wanted = " or ".join(kind.__name__ for kind in kinds)
        raise ValueError(f"this figure needs a {wanted}, the model has {type(model.head).__name__}")
    return model.head


EMBEDDING_HEADS = (ProtoSegHead, ContrastHead, HSSNHead)  # heads with an ``embed`` of unit-norm pixels


@torch.no_grad()
def pixel_embeddings(model: SegmentationModel, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Unit-norm embeddings [b·h·w, D] of images [b, 3, H, W] and the feature size (h, w)."""
    features = model.backbone(images)
    return _head(model, EMBEDDING_HEADS).embed(features), tuple(features.shape[-2:])


def images_with_class(dataset: Dataset, class_index: int, count: int, scan: int = 200) -> list[int]:
    """Indices of the ``count`` images (among the first ``scan``) where the class covers the most pixels."""
    coverage = [(int((dataset[i][1] == class_index).sum()), i) for i in range(min(scan, len(dataset)))]
    return [i for pixels, i in sorted(coverage, reverse=True)[:count] if pixels > 0]


def _similarity_row(
    model: SegmentationModel, prototypes: Tensor, class_index: int, image: Tensor, labels: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(image, index of the closest prototype of the class per class pixel (NaN elsewhere),
    the K similarity maps [K, H, W] upsampled to the image)."""
    per_class = prototypes.shape[1]
    x, (h, w) = pixel_embeddings(model, image[None])
    similarity = pk.prototype_similarity(x, prototypes, normalize=False)[:, class_index, :]
    maps = similarity.t().reshape(per_class, 1, h, w)
    maps = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
    nearest = maps.argmax(dim=0).float()
    nearest[labels != class_index] = float("nan")
    return image, nearest, maps


def similarity_range(maps: list[Tensor]) -> tuple[float, float]:
    """The colour range of the similarity maps: the 1st to 99th percentile of all their values,
    shared by every map of the figure so the prototypes compare at a glance. (The full cosine
    range [-1, 1] would make trained prototypes' maps, which span a few tenths, look alike.)"""
    values = torch.cat([m.flatten() for m in maps]).float()
    low, high = torch.quantile(values, torch.tensor([0.01, 0.99])).tolist()
    if high - low < 1e-6:  # a constant map: any small range around it
        low, high = low - 0.05, high + 0.05
    return low, high


def plot_similarity_maps(
    model: SegmentationModel, dataset: Dataset, class_index: int, class_name: str, path: str | Path,
    num_images: int = 3,
) -> Path:
    """Rows: images containing the class. Columns: the image, the pixels the closest
    prototype of the class takes (coloured by prototype, class pixels only), then
    one similarity map per prototype (cosine, upsampled to the image)."""
    head = _head(model)
    indices = images_with_class(dataset, class_index, num_images)
    if not indices:
        raise ValueError(f"no image of the dataset contains class {class_name!r}")
    per_class = head.num_prototypes
    prototypes = F.normalize(head.prototypes, dim=-1)
    columns = 2 + per_class
    figure = Figure(figsize=(1.9 * columns, 2.0 * len(indices) + 0.5))
    axes = figure.subplots(len(indices), columns, squeeze=False)
    prototype_colours = colormaps["tab10" if per_class <= 10 else "tab20"]
    rows = [_similarity_row(model, prototypes, class_index, *dataset[index]) for index in indices]
    low, high = similarity_range([maps for _, _, maps in rows])
    for row, (image, nearest, maps) in enumerate(rows):
        axes[row, 0].imshow(denormalize_image(image).permute(1, 2, 0).numpy())
        axes[row, 1].imshow(nearest.numpy(), cmap=prototype_colours, vmin=-0.5, vmax=prototype_colours.N - 0.5,
                            interpolation="nearest")
        for k in range(per_class):
            shown = axes[row, 2 + k].imshow(maps[k].numpy(), cmap="viridis", vmin=low, vmax=high)
            if row == 0:
                axes[row, 2 + k].set_title(f"prototype {k}", fontsize=9, color=prototype_colours(k))
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title(f"{class_name}: closest\nprototype", fontsize=9)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(shown, ax=axes, shrink=0.8, label="cosine similarity (range of the maps shown)")
    figure.suptitle(f"Pixel-to-prototype similarity, class {class_name!r} ({per_class} prototypes)")
    return _save(figure, path)


@torch.no_grad()
def _sample_pixels(model, dataset, class_indices, per_class: int, scan: int, seed: int):
    """Up to ``per_class`` embeddings of each class (feature-resolution labels)."""
    embeddings, classes = [], []
    for index in range(min(scan, len(dataset))):
        image, labels = dataset[index]
        x, size = pixel_embeddings(model, image[None])
        pixel_labels = downsample_labels(labels[None], size).reshape(-1)
        keep = torch.isin(pixel_labels, torch.tensor(class_indices))
        embeddings.append(x[keep])
        classes.append(pixel_labels[keep])
    embeddings, classes = torch.cat(embeddings), torch.cat(classes)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in class_indices:
        members = (classes == c).nonzero()[:, 0]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    chosen = torch.cat(chosen)
    return embeddings[chosen], classes[chosen]


def plot_embedding_projection(
    model: SegmentationModel, dataset: Dataset, class_indices: Sequence[int], class_names: Sequence[str],
    path: str | Path, pixels_per_class: int = 400, scan: int = 100, seed: int = 0,
) -> Path:
    """Pixel embeddings (dots) and prototypes (stars) of ``class_indices``, projected
    on the two principal components of the pixels."""
    head = _head(model, EMBEDDING_HEADS)
    has_prototypes = isinstance(head, ProtoSegHead)
    class_indices = list(class_indices)
    x, classes = _sample_pixels(model, dataset, class_indices, pixels_per_class, scan, seed)
    mean = x.mean(dim=0)
    _, _, components = torch.linalg.svd(x - mean, full_matrices=False)
    axes2d = components[:2].t()
    points = (x - mean) @ axes2d
    if has_prototypes:
        prototypes = F.normalize(head.prototypes[class_indices], dim=-1)  # [n, K, D]
        centres = (prototypes.reshape(-1, x.shape[1]) - mean) @ axes2d
    figure = Figure(figsize=(6.5, 5.5))
    axis = figure.subplots()
    for slot, c in enumerate(class_indices):
        colour = CLASS_COLOURS(slot % 10)
        mine = classes == c
        axis.scatter(points[mine, 0], points[mine, 1], s=5, alpha=0.35, color=colour, label=class_names[c])
        if has_prototypes:
            rows = slice(slot * head.num_prototypes, (slot + 1) * head.num_prototypes)
            axis.scatter(centres[rows, 0], centres[rows, 1], s=220, marker="*", color=colour,
                         edgecolors="black", linewidths=1.0)
    axis.set_xlabel("principal component 1")
    axis.set_ylabel("principal component 2")
    axis.set_title("Pixel embeddings (dots) and prototypes (stars), PCA" if has_prototypes
                   else f"Pixel embeddings of the {'HSSN' if isinstance(head, HSSNHead) else 'contrast'} head, PCA")
    axis.legend(markerscale=3, fontsize=8, loc="best")
    return _save(figure, path)


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(logs: Mapping[str, str | Path], path: str | Path) -> Path:
    """Training loss, PPC/PPD (runs that have them) and validation mIoU per run."""
    figure = Figure(figsize=(15, 4))
    loss_axis, proto_axis, miou_axis = figure.subplots(1, 3)
    for slot, (label, log_path) in enumerate(logs.items()):
        records = read_log(log_path)
        colour = CLASS_COLOURS(slot % 10)
        train = [r for r in records if r.get("event") == "train"]
        evals = [r for r in records if r.get("event") == "eval"]
        steps = [r["iter"] for r in train]
        loss_axis.plot(steps, [r["loss"] for r in train], color=colour, label=f"{label}: total")
        loss_axis.plot(steps, [r["ce"] for r in train], color=colour, linestyle="--", label=f"{label}: CE")
        if any(r["ppc"] for r in train):
            proto_axis.plot(steps, [r["ppc"] for r in train], color=colour, label=f"{label}: PPC")
            proto_axis.plot(steps, [r["ppd"] for r in train], color=colour, linestyle=":", label=f"{label}: PPD")
        miou_axis.plot([r["iter"] for r in evals], [100 * r["miou"] for r in evals], color=colour, marker="o",
                       label=label)
    for axis, title in ((loss_axis, "training loss"), (proto_axis, "PPC and PPD (unweighted)"),
                        (miou_axis, "validation mIoU (%)")):
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    loss_axis.set_yscale("log")
    return _save(figure, path)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path
