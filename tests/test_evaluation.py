"""The evaluation's confusion matrix names a bad label instead of failing in bincount."""

from __future__ import annotations

import pytest
import torch

from protoseg.evaluation import ConfusionMatrix


def test_the_confusion_matrix_names_a_label_outside_the_classes():
    matrix = ConfusionMatrix(3, ignore_index=255)
    matrix.update(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 255, 2]))
    assert matrix.counts.sum() == 3
    with pytest.raises(ValueError, match=r"labels must hold classes in \[0, 3\) or ignore_index=255, found 7"):
        matrix.update(torch.tensor([0, 1]), torch.tensor([7, 1]))
    with pytest.raises(ValueError, match=r"prediction must hold classes in \[0, 3\), found -1"):
        matrix.update(torch.tensor([-1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        matrix.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
