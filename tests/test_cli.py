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
