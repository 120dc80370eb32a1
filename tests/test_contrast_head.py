"""``ContrastHead`` and its training (docs/spec.md §10, §12): the loss it reports is the
fused loss of the sampled anchors against the bank as it was before the batch, the bank
fills after backward, warm-up, the original bank of ``compat="contrastiveseg"``, the CLI
with resume, and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from protoseg_fixtures import resume_matches_a_straight_run, single_thread  # noqa: F401

import protoseg_kernels as pk
from protoseg import ContrastHead, train, visualize
from protoseg.checkpoint import load_checkpoint
from protoseg.config import ConfigError, load_config
from protoseg.contrast_compat import original_enqueue
from protoseg.labels import downsample_labels
from protoseg.trainer import Trainer

IGNORE = 255
C, D = 4, 8


def make_inputs(seed, batch=2, size=12):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, 6, size, size, generator=g)
    labels = torch.randint(0, C, (batch, 2 * size, 2 * size), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.1] = IGNORE
    return features, labels


def make_head(**options):
    torch.manual_seed(0)
    defaults = {"embed_dim": D, "ignore_index": IGNORE, "max_samples": 32, "max_views": 5, "memory_size": 20,
                "pixels_per_class": 3}
    return ContrastHead(6, C, **{**defaults, **options}).train()


def expected_loss(head, features, labels, generator_seed, contrast=None):
    """The loss written with the public ops, outside the head."""
    with torch.no_grad():
        embedding = head.embedding_map(features)
        seg = head.classifier(features)
    pixel_labels = downsample_labels(labels, embedding.shape[-2:])
    batch = embedding.shape[0]
    pixels = embedding.permute(0, 2, 3, 1).reshape(-1, D)
    if head.anchors == "sampled":
        sample = pk.sample_anchors(pixel_labels.view(batch, -1), seg.argmax(1).view(batch, -1),
                                   max_samples=head.max_samples, max_views=head.max_views, ignore_index=IGNORE,
                                   generator=torch.Generator().manual_seed(generator_seed))
        anchors, anchor_labels = pixels[sample.index.clamp_min(0)], sample.labels
    else:
        anchors, anchor_labels = pixels, pixel_labels.reshape(-1)
    contrast, contrast_labels = contrast if contrast is not None else (None, None)
    return pk.pixel_contrast_loss(anchors, anchor_labels, contrast, contrast_labels, temperature=head.temperature,
                                  base_temperature=head.base_temperature, ignore_index=IGNORE)


@pytest.mark.parametrize("contrast_set,anchors,max_views", [
    ("in_batch", "sampled", 5), ("bank", "sampled", 5), ("bank", "dense", 5), ("in_batch", "dense", 5),
    ("bank", "sampled", 1),  # the head passes only the B·C·max_views = 8 filled rows of 32
])
def test_the_head_reports_the_fused_loss_of_its_anchors(contrast_set, anchors, max_views):
    head = make_head(contrast_set=contrast_set, anchors=anchors, max_views=max_views)
    for step in range(3):
        features, labels = make_inputs(step)
        before = None if head.bank is None else tuple(t.clone() for t in head.bank.contrast_set())
        out = head(features, labels, generator=torch.Generator().manual_seed(step))
        expected = expected_loss(head, features, labels, step, before)
        torch.testing.assert_close(out.contrast, expected, rtol=1e-5, atol=1e-6)
        assert out.seg.shape == (2, C, 12, 12)
        (F.cross_entropy(out.seg, downsample_labels(labels, (12, 12)), ignore_index=IGNORE) + out.contrast).backward()
        if out.contrast > 0:  # (an empty bank at the first step gives 0)
            assert head.projection[0].weight.grad.abs().sum() > 0
        head.update_memory()
        if head.bank is not None:
            assert (head.bank.labels != IGNORE).any()
        head.zero_grad()
    if contrast_set == "bank":
        assert out.contrast > 0, "a filled bank gives a positive loss"


def test_the_bank_fills_after_backward_and_a_skipped_update_is_applied_next_step():
    head = make_head(contrast_set="bank")
    features, labels = make_inputs(0)
    out = head(features, labels)
    assert (head.bank.labels == IGNORE).all(), "the enqueue must wait for backward"
    out.contrast.backward()
    head(*make_inputs(1))  # update_memory was not called: the next forward applies it
    assert (head.bank.labels != IGNORE).any()


def test_warmup_gives_zero_contrast_and_still_fills_the_bank():
    head = make_head(contrast_set="bank", warmup_iters=2)
    for step in range(2):
        out = head(*make_inputs(step))
        assert out.contrast.item() == 0
        out.contrast.backward()
        head.update_memory()
    assert head.steps == 2 and (head.bank.pointers[0] > 0).any()
    assert head(*make_inputs(2)).contrast.item() > 0


def test_eval_and_unlabelled_forwards_give_logits_only():
    head = make_head(contrast_set="bank")
    features, labels = make_inputs(0)
    assert head(features).contrast is None
    head.eval()
    out = head(features, labels)
    assert out.contrast is None and head.steps == 0 and head._pending is None


def test_compat_reproduces_the_original_bank_and_its_bugs():
    head = make_head(contrast_set="bank", compat="contrastiveseg")
    bank = head.bank
    # The original starts from random unit vectors, every slot labelled with its class.
    assert torch.equal(bank.labels[0, 2], torch.full((20,), 2))
    torch.testing.assert_close(bank.features.norm(dim=-1), torch.ones(2, C, 20))
    keys = F.normalize(torch.randn(1, D, 4, 4), dim=1)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 2:] = 3  # class 3 holds the bottom half, class 0 the top half
    before = bank.features.clone()
    original_enqueue(bank, keys, labels, pixels_per_class=3)
    assert torch.equal(bank.features[:, 0], before[:, 0]), "class 0 is never stored"
    assert bank.pointers[:, 3].tolist() == [1, 1], "the pixel pointer advances by 1, not by 3"
    top_half = F.normalize(keys[0].reshape(D, -1)[:, :8].T, dim=1)
    stored = bank.features[1, 3, :3]
    assert ((stored @ top_half.T).amax(dim=1) > 1 - 1e-6).all(), "the pixels come from raster positions < 8"
    with pytest.raises(ValueError, match="needs contrast_set='bank'"):
        make_head(contrast_set="in_batch", compat="contrastiveseg")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="contrast_set must be one of"):
        make_head(contrast_set="queue")
    with pytest.raises(ValueError, match="anchors must be one of"):
        make_head(anchors="all")
    with pytest.raises(ValueError, match="labels must hold classes"):
        make_head()(make_inputs(0)[0], torch.full((2, 24, 24), 7))


# ----------------------------------------------------------------------- training
TINY = ["model.head=contrast", "model.width=8", "model.embed_dim=16", "model.contrast_set=bank",
        "model.memory_size=40", "model.max_views=10", "model.warmup_iters=2", "data.synthetic_train_images=24",
        "data.synthetic_val_images=6", "data.synthetic_image_size=32", "data.crop_size=[32,32]",
        "data.batch_size=4", "data.val_batch_size=3", "optim.optimizer=sgd", "optim.lr=0.05", "optim.iters=6",
        "train.log_every=2", "train.eval_every=3", "train.progress=false"]


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_cli_trains_the_contrast_head(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(["demo", *TINY, f"train.output_dir={run_dir}"]) == 0
    assert "mIoU" in capsys.readouterr().out
    records = [r for r in read_log(run_dir) if r["event"] == "train"]
    assert [r["iter"] for r in records] == [2, 4, 6]
    assert records[0]["contrast"] == 0 and all(r["contrast"] > 0 for r in records[1:])
    state = load_checkpoint(run_dir / "last.pt")["model"]
    assert (state["head.bank.labels"] != IGNORE).any() and state["head.bank.pointers"].sum() > 0
    written = visualize.run([str(run_dir / "last.pt"), "--out", str(tmp_path / "figures")])
    assert sorted(p.name for p in written) == ["curves.png", "embedding_pca.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_resume_continues_identically(tmp_path, monkeypatch):
    resume_matches_a_straight_run("demo", tuple(TINY), tmp_path, monkeypatch, checkpoint_every=4)


@pytest.mark.parametrize("backbone", ["resnet18"])
def test_the_head_trains_on_a_resnet_backbone(backbone, tmp_path):
    pytest.importorskip("torchvision")
    config = load_config("demo", (*TINY, f"model.backbone={backbone}", "model.output_stride=32", "optim.iters=2",
                                  "train.eval_every=0", "data.batch_size=2", "data.synthetic_image_size=64",
                                  "data.crop_size=[64,64]", f"train.output_dir={tmp_path}"))
    trainer = Trainer(config)
    metrics = trainer.train()
    assert 0 <= metrics["miou"] <= 1 and trainer.model.head.bank.pointers.sum() > 0


def test_packaged_contrast_configs_hold_the_original_settings(tmp_path):
    in_batch = load_config("cityscapes_contrast", (f"data.root={tmp_path}",))
    assert (in_batch.model.contrast_set, in_batch.model.contrast_temperature, in_batch.model.max_views,
            in_batch.loss.contrast_weight, in_batch.model.warmup_iters) == ("in_batch", 0.1, 100, 0.1, 5000)
    bank = load_config("cityscapes_contrast_bank", (f"data.root={tmp_path}",))
    assert (bank.model.contrast_set, bank.model.contrast_temperature, bank.model.contrast_base_temperature,
            bank.model.max_views, bank.model.memory_size, bank.model.pixels_per_class,
            bank.loss.contrast_weight) == ("bank", 0.07, 0.07, 1, 5000, 10, 1.0)
    with pytest.raises(ConfigError, match="needs model.head='contrast'"):
        load_config("demo", ("model.compat=contrastiveseg",))


def test_torchrun_trains_the_contrast_head_with_a_shared_bank(tmp_path):
    run_dir = tmp_path / "run"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    overrides = [*TINY, "data.batch_size=2", "optim.iters=4", "model.memory_size=1000", f"train.output_dir={run_dir}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "protoseg.train", "demo", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = load_checkpoint(run_dir / "last.pt")["model"]
    # 4 steps × 2 ranks × 2 images, each writing one segment entry per class it holds (the
    # gathering itself is checked entry by entry in test_class_memory_bank.py).
    assert int(state["head.bank.pointers"][0].sum()) >= 4 * 2 * 2
