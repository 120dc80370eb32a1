"""ProtoSegHead and PixelPrototypeCELoss against the literal original step (docs/spec.md §8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from protoseg_fixtures import single_thread  # noqa: F401 (autouse fixture)
from protoseg_literal import literal_step

import protoseg_kernels as pk
from protoseg import LinearHead, PixelPrototypeCELoss, ProtoSegHead, downsample_labels

IGNORE = 255
C, K, C_IN, D = 5, 3, 12, 8


def make_batch(seed: int, b: int = 2, h: int = 5, w: int = 7, factor: int = 2):
    """Features [b, C_in, h, w] and labels [b, factor·h, factor·w] with ignored pixels,
    an absent class (C − 1) and a class present at three feature pixels (class 0).
    (A class at a single pixel would make its Sinkhorn assignment uniform: an exact
    tie, which the ops' own tests cover.)"""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, C_IN, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(1, C - 1, (b, h * factor, w * factor), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.15] = IGNORE
    # Nearest downsampling keeps the top-left pixel of each factor x factor block.
    labels[0, 0, 0] = labels[0, 0, factor] = labels[0, factor, 0] = 0
    return features, labels


def make_head(seed: int = 0, **options) -> ProtoSegHead:
    torch.manual_seed(seed)
    options = {"momentum": 0.9, "ignore_index": IGNORE, **options}
    head = ProtoSegHead(C_IN, C, K, D, **options).double()
    with torch.no_grad():  # non-trivial affine parameters, so their gradients are tested
        for norm in (head.feat_norm, head.mask_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    return head


def gumbel_noise(seed: int, n: int) -> torch.Tensor:
    """The draw ``protoseg_kernels.gumbel_index`` makes from a generator seeded ``seed``."""
    return -torch.empty(n, K, dtype=torch.float64).exponential_(generator=torch.Generator().manual_seed(seed)).log()


def assert_close(actual, expected, name, tol=1e-9):
    """Max error within ``tol`` of the largest magnitude, plus 1e-14 for values that
    are exactly 0 in theory (the gradient of a bias followed by BatchNorm)."""
    assert actual.shape == expected.shape, name
    assert not actual.isnan().any(), f"{name}: NaN"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale + 1e-14, f"{name}: max error {err:.3e} (scale {scale:.3e})"


def run_head(head, features, labels, generator=None):
    features = features.clone().requires_grad_()
    head.zero_grad()
    out = head(features, labels, generator=generator)
    terms = PixelPrototypeCELoss(ignore_index=IGNORE)(out, labels)
    terms.loss.backward()
    grads = {"features": features.grad, **{n: p.grad.clone() for n, p in head.named_parameters()}}
    return out, terms, grads


def run_literal(head, features, labels, noise):
    features = features.clone().requires_grad_()
    head.zero_grad()
    step = literal_step(head, features, labels, noise, IGNORE)
    step.loss.backward()
    grads = {"features": features.grad, **{n: p.grad.clone() for n, p in head.named_parameters()}}
    return step, grads


def compare_step(head, features, labels, noise, generator):
    mirror = make_head()
    mirror.load_state_dict(head.state_dict())
    expected, expected_grads = run_literal(mirror, features, labels, noise)
    # A one-pixel class has an exactly uniform Sinkhorn q, so its target is a tie that
    # rounding decides; the fused backends match the reference only up to such ties
    # (docs/spec.md §5), and this comparison needs the literal tie-breaking: the reference.
    with pk.use_backend("reference"):
        out, terms, grads = run_head(head, features, labels, generator)
    assert_close(out.seg, expected.seg, "seg logits")
    assert torch.equal(out.target, expected.target), "Sinkhorn targets"
    assert_close(head.prototypes, expected.prototypes, "updated prototypes")
    for name in ("ce", "ppc", "ppd", "loss"):
        assert_close(getattr(terms, name), getattr(expected, name), name)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert_close(grads[name], expected_grads[name], f"gradient of {name}")
    return expected


def test_compat_mode_matches_the_literal_original_step():
    head = make_head(compat="protoseg")
    assert head.assignment == "gumbel"
    initial = head.prototypes.clone()
    for step in range(3):  # later steps start from the updated prototypes
        features, labels = make_batch(seed=step)
        noise = gumbel_noise(100 + step, features.shape[0] * features.shape[2] * features.shape[3])
        compare_step(head, features, labels, noise, torch.Generator().manual_seed(100 + step))
    moved = (head.prototypes - initial).norm(dim=-1) > 1e-6
    assert moved.any() and not moved.all(), "the test should move some prototypes and keep others"


def test_default_mode_is_the_literal_step_with_the_argmax_assignment():
    head = make_head()
    assert head.assignment == "argmax"
    for step in range(2):
        features, labels = make_batch(seed=10 + step)
        zero_noise = torch.zeros(features.shape[0] * features.shape[2] * features.shape[3], K, dtype=torch.float64)
        compare_step(head, features, labels, zero_noise, None)


def test_gumbel_assignment_draws_from_the_given_generator():
    features, labels = make_batch(seed=3)
    results = []
    for seed in (5, 5, 6):
        head = make_head(assignment="gumbel")
        head(features, labels, generator=torch.Generator().manual_seed(seed))
        results.append(head.prototypes.clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_eval_and_unlabelled_forwards_learn_nothing():
    head = make_head(projection="linear")  # no BatchNorm: train and eval logits agree
    features, labels = make_batch(seed=4)
    before = head.prototypes.clone()
    train_seg = head(features).seg  # training mode without labels
    head.eval()
    eval_out = head(features, labels)
    assert eval_out.ppc is None and eval_out.ppd is None and eval_out.target is None
    assert torch.equal(head.prototypes, before) and head.steps == 0
    assert_close(eval_out.seg.detach(), train_seg.detach(), "eval logits", 0)
    assert eval_out.seg.shape == (2, C, 5, 7)


def test_warmup_steps_train_without_prototype_learning():
    head = make_head(warmup_iters=2)
    features, labels = make_batch(seed=5)
    before = head.prototypes.clone()
    for _ in range(2):
        out = head(features, labels)
        assert out.ppc.item() == 0 and out.ppd.item() == 0 and (out.target == -1).all()
        assert torch.equal(head.prototypes, before)
    out = head(features, labels)
    assert out.ppc is not None and not torch.equal(head.prototypes, before)
    assert head.steps == 3 and head.state_dict()["_extra_state"] == {"steps": 3}


def test_all_ignored_batch_gives_zero_losses_and_gradients():
    head = make_head()
    features, labels = make_batch(seed=6)
    labels.fill_(IGNORE)
    before = head.prototypes.clone()
    out, terms, grads = run_head(head, features, labels)
    for name in ("loss", "ce", "ppc", "ppd"):
        assert getattr(terms, name).item() == 0.0, name
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())
    assert_close(head.prototypes, F.normalize(before, dim=-1), "prototypes (renormalised only)", 1e-15)
    assert (out.target == -1).all()


def test_training_steps_reduce_the_loss_and_keep_prototypes_unit_norm():
    torch.manual_seed(0)
    head = ProtoSegHead(C_IN, C, K, 16, momentum=0.95, ignore_index=IGNORE)
    loss_fn = PixelPrototypeCELoss(ignore_index=IGNORE)
    # Labels constant on 2x2 blocks and features that carry each block's class (plus
    # noise), so there is something to learn.
    _, coarse = make_batch(seed=7, b=4, h=4, w=4)
    labels = coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    classes = downsample_labels(labels, (8, 8)).clamp(max=C - 1)
    features = 2 * F.one_hot(classes, C_IN).permute(0, 3, 1, 2).float() + torch.randn(4, C_IN, 8, 8)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        terms = loss_fn(head(features, labels), labels)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
        losses.append(terms.loss.item())
        norms = head.prototypes.norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert losses[-1] < 0.6 * losses[0], losses


def test_loss_accepts_plain_logits_and_class_weights():
    features, labels = make_batch(seed=8)
    logits = LinearHead(C_IN, C).double()(features).seg
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    terms = PixelPrototypeCELoss(ignore_index=IGNORE, class_weights=weights)(logits, labels)
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    expected = F.cross_entropy(up, labels, weight=weights.double(), ignore_index=IGNORE)
    assert_close(terms.loss, expected, "weighted CE", 1e-12)
    assert terms.ppc.item() == 0 and terms.ppd.item() == 0


@pytest.mark.parametrize("options, message", [
    ({"compat": "protoseg", "assignment": "argmax"}, "Gumbel"),
    ({"compat": "original"}, "compat must be one of"),
    ({"assignment": "sample"}, "assignment must be one of"),
    ({"projection": "none"}, "embed_dim == in_channels"),
    ({"temperature": 0.0}, "temperature must be a positive"),
    ({"momentum": 1.5}, "momentum must be in"),
    ({"sinkhorn_iterations": -1}, "sinkhorn_iterations must be an integer >= 0"),
])
def test_bad_head_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        ProtoSegHead(C_IN, C, K, D, **options)


@pytest.mark.parametrize("mutate, error, message", [
    (lambda labels: labels.float(), TypeError, "labels must be an integer tensor"),
    (lambda labels: labels[0], ValueError, r"labels must have shape \[2, H, W\]"),
    (lambda labels: labels.index_fill(1, torch.tensor([0]), C), ValueError, "found 5"),
    (lambda labels: labels.index_fill(1, torch.tensor([0]), -1), ValueError, "found -1"),
])
def test_bad_labels_raise_clear_errors(mutate, error, message):
    head = make_head()
    features, labels = make_batch(seed=9)
    with pytest.raises(error, match=message):
        head(features, mutate(labels))


def test_the_loss_checks_labels_unless_told_not_to():
    features, labels = make_batch(seed=10)
    logits = LinearHead(C_IN, C).double()(features).seg
    other_convention = torch.where(labels == IGNORE, 255 if IGNORE != 255 else -1, labels)
    with pytest.raises(ValueError, match=rf"labels must hold classes in \[0, {C}\) or ignore_index={IGNORE}, found"):
        PixelPrototypeCELoss(ignore_index=IGNORE)(logits, other_convention)
    with pytest.raises(ValueError, match=r"labels must have shape \[2, H, W\]"):
        PixelPrototypeCELoss(ignore_index=IGNORE)(logits, labels[:1])
    # Unchecked (a head checked them): the same loss as checked on valid labels.
    checked = PixelPrototypeCELoss(ignore_index=IGNORE)(logits, labels).loss
    assert torch.equal(PixelPrototypeCELoss(ignore_index=IGNORE, validate_labels=False)(logits, labels).loss, checked)


def test_bad_features_raise_a_clear_error():
    with pytest.raises(ValueError, match=r"features must be a \[b, C, h, w\] tensor"):
        make_head()(torch.randn(3, C_IN, dtype=torch.float64))


def test_low_precision_features_keep_the_prototype_update_in_float32():
    """With bf16 features the fp32 prototype buffer is updated in fp32: momentum steps
    far below bf16's resolution must survive."""
    torch.manual_seed(0)
    head = ProtoSegHead(8, 3, 2, 8, projection="none", momentum=0.999, ignore_index=IGNORE)
    head.feat_norm.bfloat16()
    head.mask_norm.bfloat16()
    before = head.prototypes.clone()
    out = head(torch.randn(2, 8, 4, 4).bfloat16(), torch.randint(0, 3, (2, 4, 4)))
    assert out.seg.dtype == torch.bfloat16 and out.ppc.dtype == torch.float32
    assert head.prototypes.dtype == torch.float32
    change = (head.prototypes - before).abs().max().item()
    assert 0 < change < 2e-3
    assert not torch.equal(head.prototypes, head.prototypes.bfloat16().float())
