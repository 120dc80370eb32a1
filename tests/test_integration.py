"""The heads in other people's models (docs/integration.md): the page's examples run and do what
they say (a training step reaching the backbone, predictions at the input's H × W, for torchvision
and timm backbones), ``predict_logits``/``predict_classes`` for every head, their guards, and
``model_from_checkpoint`` on a trainer's checkpoint predicting as the model that wrote it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from protoseg_fixtures import single_thread, write_tiny_training_config  # noqa: F401
from torch import nn

import protoseg
import protoseg_kernels as pk
from protoseg import (
    CheckpointError,
    ContrastHead,
    FeatureMapBackbone,
    HeadOutput,
    HSSNHead,
    LinearHead,
    PixelPrototypeCELoss,
    ProtoSegHead,
    SegmentationModel,
    model_from_checkpoint,
    predict_classes,
    predict_logits,
    upsample_logits,
)
from protoseg.checkpoint import load_checkpoint, save_checkpoint

PAGE = Path(__file__).resolve().parents[1] / "docs" / "integration.md"
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", PAGE.read_text(), flags=re.S)
PYTHON = [code for fence, code in BLOCKS if fence == "python"]


def test_every_code_block_of_the_page_is_a_python_example_run_here():
    assert BLOCKS and all(fence == "python" for fence, _ in BLOCKS), [fence for fence, _ in BLOCKS]
    shown = "".join(PYTHON)
    for needed in ("fcn_resnet50", "deeplabv3_resnet50", "timm.create_model", "model_from_checkpoint", "HSSNHead"):
        assert needed in shown, needed


def _check_training(namespace: dict) -> None:
    """A step ran: finite loss, gradients reached the backbone, the prototypes learned."""
    terms, model = namespace["terms"], namespace["model"]
    assert math.isfinite(float(terms.loss.detach()))
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.backbone.parameters())
    if isinstance(model.head, ProtoSegHead):
        assert float(terms.ppc.detach()) > 0 and model.head.steps >= 1
    assert model.training  # prediction restored the training mode


def _check_predictions(namespace: dict) -> None:
    """Whatever the example predicted has the images' H × W and carries no graph."""
    images = namespace["images"]
    predicted = [namespace[name] for name in ("logits", "classes", "prediction") if name in namespace]
    assert predicted
    for tensor in predicted:
        assert tensor.shape[0] == images.shape[0] and tensor.shape[-2:] == images.shape[-2:]
        assert not tensor.requires_grad
    if "classes" in namespace:
        assert namespace["classes"].dtype == torch.int64 and namespace["classes"].dim() == 3


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=[f"block-{i}" for i in range(len(PYTHON))])
def test_documented_example_runs_and_does_what_it_says(index):
    code = PYTHON[index]
    for module in ("torchvision", "timm"):
        if f"import {module}" in code or f"from {module}" in code:
            pytest.importorskip(module)
    namespace: dict = {}
    exec(compile(code, f"docs/integration.md block {index}", "exec"), namespace)
    if "terms" in namespace:
        _check_training(namespace)
    _check_predictions(namespace)
    if "message" in namespace:  # the checkpoint example: the changed weight was refused
        assert "changed.pt is corrupt" in namespace["message"] and "load another checkpoint" in namespace["message"]
        assert not namespace["run_dir"].exists()


def _model(kind: str) -> SegmentationModel:
    torch.manual_seed(0)
    backbone = FeatureMapBackbone(nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU()), 8)
    if kind == "hssn":
        head = HSSNHead(8, pk.Hierarchy.from_groups([[0, 1], [2]]), embed_dim=8, triplet_ramp_iters=0,
                        ignore_index=-1)
    elif kind == "protoseg":
        head = ProtoSegHead(8, num_classes=3, num_prototypes=2, embed_dim=8, ignore_index=-1)
    elif kind == "contrast":
        head = ContrastHead(8, num_classes=3, embed_dim=8, ignore_index=-1)
    else:
        head = LinearHead(8, num_classes=3)
    return SegmentationModel(backbone, head)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 36, 44, generator=generator)  # not a multiple of the stride
    labels = torch.randint(0, 3, (2, 36, 44), generator=generator)
    labels[:, :5] = -1
    return images, labels


@pytest.mark.parametrize("kind", ["protoseg", "linear", "contrast", "hssn"])
def test_every_head_predicts_at_the_input_resolution(kind):
    model, (images, labels) = _model(kind), _batch()
    terms = PixelPrototypeCELoss(ignore_index=-1)(model(images, labels), labels)
    terms.loss.backward()  # a training step first: the model stays in training mode
    logits = predict_logits(model, images)
    classes = predict_classes(model, images)
    assert model.training and not logits.requires_grad
    assert logits.shape == (2, 3, 36, 44) and logits.dtype == torch.float32
    assert classes.shape == (2, 36, 44) and classes.dtype == torch.int64
    model.eval()
    with torch.no_grad():
        output = model(images)
    for size in ((36, 44), images, labels, torch.Size([36, 44])):  # the size, or a tensor of it
        assert torch.equal(predict_logits(output, size, head=model.head), logits)
        assert torch.equal(predict_classes(output, size, head=model.head), classes)
    if kind == "hssn":
        assert torch.equal(classes, model.head.predict(output, (36, 44)))
        assert torch.equal(classes, logits.argmax(1))  # the rule's scores agree with its prediction
        expected = pk.hierarchy_scores(upsample_logits(output.nodes, (36, 44)), model.head.hierarchy)
    else:
        assert torch.equal(classes, logits.argmax(1))
        expected = upsample_logits(output.seg, (36, 44))
        assert torch.equal(predict_logits(output.seg, (36, 44)), expected)  # plain logits too
    assert torch.equal(logits, expected)


def test_low_precision_logits_come_back_in_fp32():
    seg = torch.randn(1, 3, 4, 4).to(torch.bfloat16)
    logits = predict_logits(HeadOutput(seg), (8, 8))
    assert logits.dtype == torch.float32 and torch.equal(logits, upsample_logits(seg.float(), (8, 8)))


def test_a_head_output_where_a_tensor_is_expected_is_refused_clearly():
    model, (images, _) = _model("protoseg"), _batch()
    output = model.eval()(images)
    with pytest.raises(TypeError, match=r"images \[b, C, H, W\], got HeadOutput.*predict_logits\(output, \(H, W\)\)"):
        predict_logits(model, output)
    with pytest.raises(TypeError, match="the output size must be"):
        predict_logits(output, output)
    with pytest.raises(TypeError, match=r"got dict with keys \['out'\].*SegmentationModel.*docs/integration.md"):
        predict_logits({"out": output.seg}, (36, 44))
    hssn = _model("hssn").eval()
    with pytest.raises(ValueError, match="head=model.head"):
        predict_logits(hssn(images), (36, 44))


def test_the_in_place_classifier_replacement_fails_with_a_message_pointing_to_the_fix():
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    fcn = segmentation.fcn_resnet50(weights=None, weights_backbone=None).eval()
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match=r"got OrderedDict with keys \['out'\]"):  # torchvision's own output
        predict_logits(fcn, images)
    fcn.classifier = ProtoSegHead(2048, num_classes=3, num_prototypes=2, embed_dim=8, ignore_index=-1)
    with torch.no_grad(), pytest.raises(AttributeError, match=r"'HeadOutput' is not a tensor \(no attribute 'dim'\).*"
                                                               r"predict_logits.*docs/integration.md"):
        fcn(images)
    backbone = FeatureMapBackbone(fcn.backbone, output_key="out")  # the page's fix
    assert backbone.out_channels == 2048
    assert predict_logits(SegmentationModel(backbone, fcn.classifier), images).shape == (1, 3, 32, 32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer after a two-step run, and the checkpoint it wrote."""
    from protoseg.config import load_config
    from protoseg.trainer import Trainer

    folder = tmp_path_factory.mktemp("integration")
    config = write_tiny_training_config(folder, train_images=8, val_images=3, iters=2, log_every=1, eval_every=2)
    trainer = Trainer(load_config(str(config), (f"train.output_dir={folder / 'run'}",)))
    trainer.train()
    return trainer, folder / "run" / "last.pt"


def test_a_checkpoint_loaded_for_inference_predicts_as_the_model_that_wrote_it(trained):
    trainer, path = trained
    model, _, class_names, _ = protoseg.model_from_checkpoint(path)
    assert not model.training and class_names == trainer.class_names
    images = torch.stack([trainer.data.val[i][0] for i in range(3)])
    images = torch.nn.functional.interpolate(images, size=(40, 48), mode="bilinear")  # any input size
    expected = predict_logits(trainer.model, images)
    assert expected.shape == (3, len(class_names), 40, 48)
    assert torch.equal(predict_logits(model, images), expected)
    assert torch.equal(predict_classes(model, images), predict_classes(trainer.model, images))


def test_a_damaged_checkpoint_is_refused_for_inference_naming_it(trained, tmp_path):
    _, path = trained
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        model_from_checkpoint(truncated)
    assert str(truncated) in str(info.value) and "load another checkpoint" in str(info.value)
    assert "train.resume" not in str(info.value)  # the training advice is for resuming

    state = load_checkpoint(path)
    state["model"]["head.prototypes"] = state["model"]["head.prototypes"][:, :1]  # a valid checksum, wrong shape
    mismatched = tmp_path / "mismatched.pt"
    save_checkpoint(mismatched, {k: v for k, v in state.items() if k not in ("checksum", "format_version")})
    with pytest.raises(CheckpointError, match="holds weights that do not fit its model"):
        model_from_checkpoint(mismatched)
