"""The training CLI's first contact: ``--help`` without torch, and listed choices that cannot
work rejected with one line naming the key, before any training starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protoseg import train

ROOT = Path(__file__).resolve().parent.parent


def test_help_answers_without_importing_torch():
    probe = ("import sys\nfrom protoseg import train\ntry:\n    train.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "packaged configs:" in result.stdout and result.stdout.strip().endswith("False")
    assert "``" not in result.stdout  # reST literals shown as plain text


BAD_CHOICES = [
    (["model.backbone=resnet18"], "model.backbone=resnet18 supports only model.output_stride=32"),
    (["model.projection=none", "model.embed_dim=16"], "model.projection=none keeps the backbone's"),
    (["model.compat=hssn"], "model.compat='hssn' needs model.head='hssn'"),
]
if not torch.cuda.is_available():
    BAD_CHOICES.append((["train.device=cuda"], "train.device=cuda but no CUDA device is available"))


@pytest.mark.parametrize("overrides,message", BAD_CHOICES, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_choice_that_cannot_work_is_one_line(overrides, message, tmp_path, capsys):
    assert train.main(["demo", *overrides, "optim.iters=1", f"train.output_dir={tmp_path}",
                       "train.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("protoseg-train: error: ") and message in err and "\n" not in err


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    common = ["demo", "model.head=linear", "model.width=8", "data.synthetic_train_images=8",
              "data.synthetic_val_images=2", "data.synthetic_image_size=32", "data.crop_size=[32,32]",
              "data.batch_size=4", "optim.iters=2", "train.progress=false", f"train.output_dir={tmp_path}"]
    assert train.main(common) == 0
    log = (tmp_path / "log.jsonl").read_text()
    assert train.main(common) == 2
    err = capsys.readouterr().err
    assert "already holds a run (last.pt, log.jsonl, metrics.json)" in err and "train.overwrite=true" in err
    assert (tmp_path / "log.jsonl").read_text() == log  # untouched
    assert train.main([*common, "train.resume=auto"]) == 0  # nothing left to train: resumes and finishes
    assert train.main([*common, "train.overwrite=true"]) == 0
