"""NaN in means NaN out, identically on every backend (docs/spec.md §5): class scores, their
index and log-sum-exp, the PPC/PPD losses, the prototype update, and the fp64 norm clamp."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSED_CPU_BACKENDS, require_backend
from helpers import make_case

import protoseg_kernels as pk

NAN = float("nan")
BACKENDS = ("reference",) + FUSED_CPU_BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param != "reference":
        require_backend(request.param)
    with pk.use_backend(request.param):
        yield request.param


def case_with_nans():
    """Pixel 3 has one NaN feature and prototype (1, 2) one NaN entry, so pixel 3 scores NaN
    everywhere and every pixel scores NaN against prototype (1, 2) (normalised or not)."""
    case = make_case(40, 8, 3, 4, seed=5, dtype=torch.float32, ignore_fraction=0.0)
    x, prototypes = case.x.clone(), case.prototypes.clone()
    x[3, 4] = NAN
    prototypes[1, 2, 6] = NAN
    return case, x, prototypes


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["max", "logsumexp"])
def test_class_scores_propagate_nan_with_the_first_nan_index(backend, normalize, reduction):
    _, x, prototypes = case_with_nans()
    out = pk.class_scores(x, prototypes, normalize=normalize, reduction=reduction, return_index=True,
                          lse_temperature=0.1)
    with pk.use_backend("reference"):
        ref = pk.class_scores(x, prototypes, normalize=normalize, reduction=reduction, return_index=True,
                              lse_temperature=0.1)
    # The NaN pixel: every class and its lse are NaN; its index is the first NaN (k = 0).
    assert torch.isnan(out.scores[3]).all() and torch.isnan(out.lse[3])
    assert out.index[3].tolist() == [0, 0, 0]
    # Class 1 of every pixel meets the NaN prototype (k = 2): NaN score at index 2, NaN lse.
    assert torch.isnan(out.scores[:, 1]).all() and torch.isnan(out.lse).all()
    assert (out.index[torch.arange(40) != 3, 1] == 2).all()
    # Everything else equals the reference, NaNs at the same places.
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(out.index, ref.index)


def test_ppc_ppd_are_nan_for_a_nan_pixel_and_its_mean(backend):
    case, x, prototypes = case_with_nans()
    prototypes[1, 2, 6] = 0.5  # only the pixel is NaN here
    ppc, ppd = pk.ppc_ppd_loss(x, prototypes, case.target, temperature=0.1, reduction="none")
    assert torch.isnan(ppc[3]) and torch.isnan(ppd[3])
    assert torch.isfinite(ppc[torch.arange(40) != 3]).all()
    mean_ppc, mean_ppd = pk.ppc_ppd_loss(x, prototypes, case.target, temperature=0.1)
    assert torch.isnan(mean_ppc) and torch.isnan(mean_ppd)


def test_update_prototypes_propagate_a_nan_feature_to_its_prototype_only(backend):
    case, x, prototypes = case_with_nans()
    prototypes[1, 2, 6] = 0.5
    out = pk.update_prototypes(prototypes, x, case.labels, case.index, momentum=0.9)
    with pk.use_backend("reference"):
        ref = pk.update_prototypes(prototypes, x, case.labels, case.index, momentum=0.9)
    c, k = int(case.labels[3]), int(case.index[3])
    assert torch.isnan(out.prototypes[c, k]).all(), "the whole prototype, not D - 1 huge values"
    others = torch.ones(3, 4, dtype=torch.bool)
    others[c, k] = False
    assert torch.isfinite(out.prototypes[others]).all()
    torch.testing.assert_close(out.prototypes, ref.prototypes, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_the_fp64_norm_clamp_is_the_reference_eps(backend):
    """A zero row's gradient is g/eps: with a float eps the compiled backends differed by 4e-9."""
    if backend == "triton":
        pytest.skip("triton does not compute in float64")
    x = torch.randn(5, 6, dtype=torch.float64)
    x[2] = 0.0
    x.requires_grad_()
    prototypes = torch.randn(2, 3, 6, dtype=torch.float64)
    pk.prototype_similarity(x, prototypes).sum().backward()
    grad = x.grad.clone()
    with pk.use_backend("reference"):
        x.grad = None
        pk.prototype_similarity(x, prototypes).sum().backward()
    torch.testing.assert_close(grad[2], x.grad[2], rtol=1e-12, atol=0)


@pytest.mark.parametrize("where", ["pixel", "prototype"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_a_nan_similarity_invalidates_its_own_class_and_no_other(backend, where, iterations):
    """docs/spec.md §3.4: the class holding a NaN similarity gets NaN q and index -1 on all its
    pixels; every other class gets exactly what it gets without the NaN pixel."""
    case = make_case(60, 8, 3, 4, seed=8, dtype=torch.float32, ignore_fraction=0.1)
    x, prototypes, labels = case.x.clone(), case.prototypes.clone(), case.labels.clone()
    bad_class = 1
    labels[7] = bad_class
    if where == "pixel":
        x[7, 2] = NAN
    else:
        prototypes[bad_class, 3, 0] = NAN
    out = pk.sinkhorn_assign(x, prototypes, labels, epsilon=0.1, iterations=iterations, return_q=True)
    mine = labels == bad_class
    assert (out.index[mine] == -1).all() and torch.isnan(out.q[mine]).all()
    clean_x, clean_p, clean_labels = case.x.clone(), case.prototypes.clone(), labels.clone()
    clean_labels[mine] = -1  # the class left out; every other pixel as before
    expected = pk.sinkhorn_assign(clean_x, clean_p, clean_labels, epsilon=0.1, iterations=iterations,
                                  return_q=True)
    others = ~mine
    assert torch.equal(out.index[others], expected.index[others])
    torch.testing.assert_close(out.q[others], expected.q[others], rtol=1e-6, atol=1e-7)


def test_an_ignored_nan_pixel_reaches_no_prototype(backend):
    """Found by tests/fuzz.py: the reference added 0·x of ignored pixels to prototype 0."""
    case = make_case(30, 6, 3, 2, seed=2, dtype=torch.float32, ignore_fraction=0.0)
    x, labels = case.x.clone(), case.labels.clone()
    labels[4] = -1
    x[4, 1] = NAN
    out = pk.update_prototypes(case.prototypes, x, labels, case.index, momentum=0.5)
    assert torch.isfinite(out.prototypes).all()


# ---- ±inf (docs/spec.md §3, "Non-finite inputs") ---------------------------------------------
def case_with_infinities():
    """Infinite features: pixel 3 has +inf at feature 0 and −inf at feature 5 (raw similarities
    ±inf or inf − inf = NaN), pixel 7 is +inf at feature 0 and 0 elsewhere (raw similarities
    +inf for the prototypes with a positive entry 0, at least two of them, and −inf for the
    others), pixel 9 is −inf at feature 4; every other pixel is finite."""
    case = make_case(40, 8, 3, 4, seed=6, dtype=torch.float32, ignore_fraction=0.0)
    x = case.x.clone()
    x[3, 0], x[3, 5] = float("inf"), float("-inf")
    x[7] = 0.0
    x[7, 0] = float("inf")
    x[9, 4] = float("-inf")
    case.prototypes[0, 1, 0], case.prototypes[2, 3, 0] = 0.5, 0.25  # two +inf similarities of pixel 7
    return case, x


def assert_same_nonfinite(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    ref = ref.to(out.dtype)
    for kind, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(where(out), where(ref)), f"{what}: {kind} where the reference has none, or missing"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-4, atol=1e-4, msg=what)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["max", "logsumexp"])
def test_infinite_features_give_the_references_infinities_and_nans(backend, normalize, reduction):
    case, x = case_with_infinities()
    out = pk.class_scores(x, case.prototypes, normalize=normalize, reduction=reduction, lse_temperature=0.1)
    loss = pk.ppc_ppd_loss(x, case.prototypes, case.target, normalize=normalize, temperature=0.1,
                           reduction="none")
    with pk.use_backend("reference"):
        ref = pk.class_scores(x.double(), case.prototypes.double(), normalize=normalize, reduction=reduction,
                              lse_temperature=0.1)
        ref_loss = pk.ppc_ppd_loss(x.double(), case.prototypes.double(), case.target, normalize=normalize,
                                   temperature=0.1, reduction="none")
    if normalize:  # an infinite entry makes the normalised row NaN
        assert torch.isnan(out.scores[[3, 7, 9]]).all() and torch.isnan(out.lse[[3, 7, 9]]).all()
    else:  # the rule of an infinite maximum: two +inf similarities give a +inf lse, not NaN
        assert torch.isposinf(out.lse[7]) and torch.isposinf(ref.lse[7])
    assert_same_nonfinite(out.scores, ref.scores, "scores")
    assert_same_nonfinite(out.lse, ref.lse, "lse")
    for name, a, b in zip(("ppc", "ppd"), loss, ref_loss):
        assert_same_nonfinite(a, b, name)
    assert torch.isfinite(out.scores[[i for i in range(40) if i not in (3, 7, 9)]]).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_infinite_contrast_anchors_give_the_references_infinities_and_nans(backend, normalize):
    g = torch.Generator().manual_seed(3)
    anchors = torch.nn.functional.normalize(torch.randn(12, 6, generator=g), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2] * 2)
    anchors[1, 0], anchors[6, 3] = float("inf"), float("-inf")
    out = pk.pixel_contrast_loss(anchors, labels, normalize=normalize, reduction="none")
    with pk.use_backend("reference"):
        ref = pk.pixel_contrast_loss(anchors.double(), labels, normalize=normalize, reduction="none")
    assert_same_nonfinite(out, ref, "pixel contrast")
