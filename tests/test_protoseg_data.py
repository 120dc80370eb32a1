"""Datasets, augmentation, sampler and backbones: the synthetic scenes, the
Cityscapes and ADE20K folder loaders on fixture folders, and the adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from protoseg_fixtures import single_thread  # noqa: F401 (autouse fixture)
from torch import nn

from protoseg import FeatureMapBackbone, ProtoSegHead, SegmentationModel, SmallCNN, torchvision_resnet, train
from protoseg.data import (
    IGNORE_INDEX,
    ADE20KFolder,
    CityscapesFolder,
    DatasetError,
    EpochBatchSampler,
    SyntheticScenes,
    TrainSet,
    pad_collate,
)
from protoseg.data.synthetic import NUM_MODES, mode_appearance
from protoseg.data.transforms import EvalTransform, TrainTransform, normalize_image


def save_png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def random_rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def cityscapes_root(tmp_path):
    """Two cities in train, one image in val; labelIds include ignored ids."""
    rng = np.random.default_rng(0)
    root = tmp_path / "cityscapes"
    label_ids = np.array([[7, 26, 0, 33], [24, 1, 23, 255]], dtype=np.uint8).repeat(4, 0).repeat(8, 1)  # 8 x 32
    for split, names in (("train", ["aachen/aachen_000000_000019", "bonn/bonn_000001_000019"]),
                         ("val", ["lindau/lindau_000000_000019"])):
        for name in names:
            save_png(root / "leftImg8bit" / split / f"{name}_leftImg8bit.png", random_rgb(rng, 8, 32), "RGB")
            save_png(root / "gtFine" / split / f"{name}_gtFine_labelIds.png", label_ids, "L")
    return root


@pytest.fixture
def ade20k_root(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "ADEChallengeData2016"
    annotation = np.array([[0, 1, 150, 13]], dtype=np.uint8).repeat(6, 0).repeat(3, 1)  # 6 x 12
    for split, count in (("training", 2), ("validation", 1)):
        for i in range(count):
            name = f"ADE_{split}_{i:08d}"
            path = root / "images" / split / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(random_rgb(rng, 6 + 2 * i, 12)).save(path, quality=95)
            save_png(root / "annotations" / split / f"{name}.png",
                     np.concatenate([annotation, annotation[: 2 * i]]) if i else annotation, "L")
    return root


def test_cityscapes_folder_maps_label_ids_to_train_ids(cityscapes_root):
    train_set = CityscapesFolder(cityscapes_root, "train")
    assert len(train_set) == 2 and len(CityscapesFolder(cityscapes_root, "val")) == 1
    assert len(train_set.class_names) == 19 and train_set.class_names[13] == "car"
    image, labels = train_set[0]
    assert image.shape == (3, 8, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    expected = torch.tensor([[0, 13, IGNORE_INDEX, 18], [11, IGNORE_INDEX, 10, IGNORE_INDEX]])
    assert torch.equal(labels, expected.repeat_interleave(4, 0).repeat_interleave(8, 1))
    assert train_set.pairs[0][0].name == "aachen_000000_000019_leftImg8bit.png"


def test_ade20k_folder_reduces_the_zero_label(ade20k_root):
    train_set = ADE20KFolder(ade20k_root, "train")
    assert len(train_set) == 2 and len(ADE20KFolder(ade20k_root, "val")) == 1
    assert len(train_set.class_names) == 150 and train_set.class_names[0] == "wall"
    image, labels = train_set[0]
    assert image.shape == (3, 6, 12)
    assert torch.equal(labels[0], torch.tensor([IGNORE_INDEX, 0, 149, 12]).repeat_interleave(3))
    assert train_set[1][1].shape == (8, 12)


def test_missing_folders_and_files_give_clear_errors(cityscapes_root, ade20k_root, tmp_path):
    with pytest.raises(DatasetError, match="Cityscapes root folder not found"):
        CityscapesFolder(tmp_path / "missing")
    with pytest.raises(DatasetError, match=r"Cityscapes test image folder not found: .*leftImg8bit/test"):
        CityscapesFolder(cityscapes_root, "test")
    next((cityscapes_root / "gtFine" / "val").rglob("*.png")).unlink()
    with pytest.raises(DatasetError, match="label file missing for .*lindau.*expected .*gtFine_labelIds.png"):
        CityscapesFolder(cityscapes_root, "val")
    with pytest.raises(DatasetError, match="ADE20K validation annotation folder not found"):
        (ade20k_root / "annotations" / "validation" / "ADE_validation_00000000.png").unlink()
        (ade20k_root / "annotations" / "validation").rmdir()
        ADE20KFolder(ade20k_root, "val")
    empty = tmp_path / "empty"
    (empty / "images" / "training").mkdir(parents=True)
    (empty / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        ADE20KFolder(empty, "train")


def test_cli_trains_on_a_cityscapes_folder(cityscapes_root, tmp_path):
    argv = ["data.dataset=cityscapes", f"data.root={cityscapes_root}", "data.crop_size=[8,16]", "data.batch_size=2",
            "data.val_batch_size=1", "data.eval_scale=0.5", "model.width=4", "model.embed_dim=8",
            "model.num_prototypes=2", "optim.iters=2", "train.progress=false", f"train.output_dir={tmp_path / 'run'}"]
    assert train.main(argv) == 0
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_synthetic_scenes_are_deterministic_with_disjoint_splits():
    a, b = SyntheticScenes("train", 6, 32, seed=3), SyntheticScenes("train", 6, 32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, SyntheticScenes("val", 6, 32, seed=3).images)
    assert not torch.equal(a.images, SyntheticScenes("train", 6, 32, seed=4).images)
    scenes = SyntheticScenes("train", 60, 64)
    present = scenes.labels.unique().tolist()
    assert present == sorted([0, 1, 2, 3, 4, IGNORE_INDEX])
    assert scenes.images.shape == (60, 3, 64, 64) and 0 <= scenes.images.min() and scenes.images.max() <= 1


def test_every_texture_and_colour_occurs_in_every_class():
    """The modes form a Latin square: appearance cues alone never identify a class."""
    pairs = {(cls, mode): mode_appearance(cls, mode) for cls in range(1, 5) for mode in range(NUM_MODES)}
    assert len(set(pairs.values())) == 16  # each (texture, colour) belongs to one class
    for cls in range(1, 5):
        assert {pairs[cls, m][0] for m in range(NUM_MODES)} == set(range(NUM_MODES))
        assert {pairs[cls, m][1] for m in range(NUM_MODES)} == set(range(NUM_MODES))


def test_augmentation_is_a_function_of_the_key():
    base = SyntheticScenes("train", 4, 32)
    train_set = TrainSet(base, TrainTransform((24, 20), (0.5, 1.5)), seed=0)
    image, labels = train_set[(1, 0)]
    assert image.shape == (3, 24, 20) and labels.shape == (24, 20) and labels.dtype == torch.int64
    again = train_set[(1, 0)]
    assert torch.equal(image, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(image, train_set[(1, 1)][0])  # another epoch, another augmentation
    # A crop larger than the rescaled image is padded with ignored labels.
    padded = TrainSet(base, TrainTransform((48, 48), (0.5, 0.5), flip=False), seed=0)[(0, 0)][1]
    assert (padded[16:] == IGNORE_INDEX).all() and (padded[:, 16:] == IGNORE_INDEX).all()
    assert torch.equal(padded[:16, :16], base[0][1][::2, ::2])


def test_eval_transform_resizes_images_only():
    image, labels = SyntheticScenes("val", 1, 32)[0]
    scaled, same = EvalTransform(0.5)(image, labels)
    assert scaled.shape == (3, 16, 16) and same is labels
    assert torch.equal(EvalTransform()(image, labels)[0], normalize_image(image))


def test_pad_collate_pads_images_and_labels():
    batch = [(torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64)),
             (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.int64))]
    images, labels = pad_collate(batch)
    assert images.shape == (2, 3, 6, 5) and labels.shape == (2, 6, 5)
    assert images[0, :, 4:].eq(0).all() and labels[0, 4:].eq(IGNORE_INDEX).all()
    assert labels[1, :, 3:].eq(IGNORE_INDEX).all() and labels[1, :, :3].eq(1).all()


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_sampler_shards_global_batches_and_resumes():
    single = take(iter(EpochBatchSampler(10, 4, seed=1)), 6)  # 2 batches per epoch
    ranks = [take(iter(EpochBatchSampler(10, 2, seed=1, rank=r, world_size=2)), 6) for r in range(2)]
    for step in range(6):
        assert ranks[0][step] + ranks[1][step] == single[step]
    assert [key[1] for batch in single for key in batch[:1]] == [0, 0, 1, 1, 2, 2]
    assert len({key[0] for key in single[0] + single[1]}) == 8  # no repeat within an epoch
    assert take(iter(EpochBatchSampler(10, 4, seed=1, start=3)), 3) == single[3:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(3, 2, world_size=2)


class DictBackbone(nn.Module):
    """A backbone returning a dict of feature maps (as torchvision's feature extractors do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 3, stride=4, padding=1)

    def forward(self, images):
        features = self.conv(images)
        return {"low": images, "out": features}


def test_feature_map_adapter_selects_the_map_and_infers_channels():
    adapter = FeatureMapBackbone(DictBackbone(), output_key="out")
    assert adapter.out_channels == 7
    assert FeatureMapBackbone(DictBackbone()).out_channels == 7  # default: the last entry
    model = SegmentationModel(adapter, ProtoSegHead(adapter.out_channels, 3, 2, 8))
    labels = torch.randint(0, 3, (2, 32, 32))
    out = model(torch.randn(2, 3, 32, 32), labels)
    assert out.seg.shape == (2, 3, 8, 8) and out.ppc is not None
    with pytest.raises(ValueError, match=r"must return a \[b, C, h, w\] feature map, got \(2, 3, 16\)"):
        FeatureMapBackbone(nn.Flatten(2), out_channels=3)(torch.randn(2, 3, 4, 4))


def test_small_cnn_output_stride_4():
    features = SmallCNN(width=4)(torch.randn(2, 3, 40, 24))
    assert features.shape == (2, 24, 10, 6)


def test_torchvision_resnet_backbone():
    pytest.importorskip("torchvision")
    backbone = torchvision_resnet(50, output_stride=8)
    assert backbone.out_channels == 2048
    model = SegmentationModel(backbone, ProtoSegHead(2048, 4, 2, 32)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 48)).seg.shape == (1, 4, 8, 6)
    assert torchvision_resnet(18, output_stride=32).out_channels == 512
    with pytest.raises(ValueError, match="ResNet-18 supports only output_stride=32"):
        torchvision_resnet(18, output_stride=8)
