"""pixel_contrast_loss (docs/spec.md §10.1): the reference against the literal formulas and the
naive dense baseline, both modes and both denominators, ignored and positive-less
anchors, empty batches, gradients, registration, bad inputs, dtypes, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conformance import check_pixel_contrast_loss
from conftest import FUSED_CPU_BACKENDS, require_backend
from contrast_cases import DENOMINATORS, MODES, ContrastCase, make_contrast_case
from contrast_literal import pixel_contrast as literal_pixel_contrast
from helpers import F64, assert_bitwise_equal, assert_close, largest_allocation, relative_error
from torch import Tensor

import protoseg_kernels as pk
from benchmarks.contrast_baseline import contrastive_loss
from protoseg_kernels._backend import op_dtype_reason, resolve_backend


def _literal(case: ContrastCase, **kw) -> tuple[Tensor, list[int]]:
    return literal_pixel_contrast(*case.args(), **kw)


KW = dict(temperature=0.1, base_temperature=0.07)


@pytest.fixture(params=("reference", *FUSED_CPU_BACKENDS))
def contrast_backend(request):
    """Every backend that implements the op and runs on CPU tensors here, selected."""
    require_backend(request.param, "pixel_contrast_loss")
    with pk.use_backend(request.param):
        yield request.param


def _exact_dtype(backend: str) -> tuple[torch.dtype, float]:
    """(float64, 1e-10) where the backend computes in float64, else (float32, 1e-5)."""
    if op_dtype_reason(backend, "pixel_contrast_loss", F64) is None:
        return F64, 1e-10
    return torch.float32, 1e-5


def _cast(case: ContrastCase, dtype: torch.dtype) -> ContrastCase:
    return ContrastCase(case.anchors.to(dtype), case.anchor_labels,
                        None if case.contrast is None else case.contrast.to(dtype), case.contrast_labels)


# ---- values ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("normalize,temperature", [(True, 0.1), (True, 0.07), (False, 2.0)])
def test_reference_matches_literal(mode, denominator, normalize, temperature, reference_backend):
    case = make_contrast_case(61, 83, 13, 5, mode, seed=1)
    kw = dict(temperature=temperature, base_temperature=0.07, normalize=normalize, denominator=denominator)
    expected, counts = _literal(case, **kw)
    with_positive = sum(c > 0 for c in counts)
    assert 0 < with_positive < len(counts)  # the case has anchors without positives
    none = pk.pixel_contrast_loss(*case.args(), **kw, reduction="none")
    assert none.dtype == F64
    assert_close(none, expected, 1e-10, "per-anchor loss")
    assert bool((none[torch.tensor(counts) == 0] == 0).all())
    assert_close(pk.pixel_contrast_loss(*case.args(), **kw, reduction="sum"), expected.sum(), 1e-10)
    assert_close(pk.pixel_contrast_loss(*case.args(), **kw), expected.sum() / with_positive, 1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_gradients_match_literal_autograd(mode, denominator, normalize, reference_backend):
    case = make_contrast_case(37, 45, 9, 4, mode, seed=2)
    weight = torch.randn(37, generator=torch.Generator().manual_seed(3), dtype=F64)
    kw = dict(temperature=0.1, base_temperature=0.07, normalize=normalize, denominator=denominator)

    def grads(fn):
        leaves = [case.anchors.clone().requires_grad_()]
        contrast = None
        if case.contrast is not None:
            contrast = case.contrast.clone().requires_grad_()
            leaves.append(contrast)
        loss = fn(leaves[0], case.anchor_labels, contrast, case.contrast_labels)
        return torch.autograd.grad((loss * weight).sum(), leaves)

    got = grads(lambda *args: pk.pixel_contrast_loss(*args, **kw, reduction="none"))
    want = grads(lambda *args: literal_pixel_contrast(*args, **kw)[0])
    for name, g, w in zip(("d anchors", "d contrast"), got, want):
        assert float(w.norm()) > 0
        assert_close(g, w, 1e-9, name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_ragged_large_reference_matches_literal_rows(mode, denominator, reference_backend):
    """A = 1031, M = 4099, D = 77: the literal on a sample of anchors (each anchor's loss
    depends on the whole contrast set, so a sample checks every column)."""
    case = make_contrast_case(1031, 4099, 77, 19, mode, seed=4, dtype=torch.float32)
    rows = torch.randperm(1031, generator=torch.Generator().manual_seed(5))[:12].tolist()
    kw = dict(denominator=denominator, **KW)
    none = pk.pixel_contrast_loss(*case.args(), **kw, reduction="none")
    assert none.dtype == torch.float32
    expected, counts = _literal(case, rows=rows, **kw)
    assert any(counts)
    assert_close(none[rows], expected, 1e-5, "sampled per-anchor loss")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_ragged_large_reference_matches_dense_baseline(mode, denominator, reference_backend):
    """A = 1031, M = 4099, D = 77 in float64: loss and both gradients against the naive
    formula of benchmarks/contrast_baseline.py (dense masks, autograd)."""
    case = make_contrast_case(1031, 4099, 77, 19, mode, seed=6)
    kw = dict(denominator=denominator, **KW)

    def run(fn):
        anchors = case.anchors.clone().requires_grad_()
        leaves = [anchors]
        contrast = None
        if case.contrast is not None:
            contrast = case.contrast.clone().requires_grad_()
            leaves.append(contrast)
        loss = fn(anchors, case.anchor_labels, contrast, case.contrast_labels, **kw)
        return [loss, *torch.autograd.grad(loss, leaves)]

    for name, got, want in zip(("loss", "d anchors", "d contrast"), run(pk.pixel_contrast_loss),
                               run(contrastive_loss)):
        assert_close(got, want, 1e-10, name)


@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_single_anchor_and_single_column(denominator, contrast_backend):
    dtype, tol = _exact_dtype(contrast_backend)
    g = torch.Generator().manual_seed(7)
    one = torch.randn(1, 6, generator=g, dtype=F64).to(dtype)
    kw = dict(denominator=denominator, **KW)
    # A = 1 in-batch: nothing to contrast with.
    assert float(pk.pixel_contrast_loss(one, torch.tensor([2]), **kw)) == 0
    # M = 1, a positive and no negative: log(e^ℓ) − ℓ = 0 for both denominators.
    loss = pk.pixel_contrast_loss(one, torch.tensor([2]), torch.randn(1, 6, generator=g, dtype=F64).to(dtype),
                                  torch.tensor([2]), **kw, reduction="none")
    assert loss.shape == (1,) and abs(float(loss)) < tol
    # A = 1 against a bank, and M = 1 against several anchors.
    for a, m in ((1, 29), (13, 1)):
        case = ContrastCase(torch.randn(a, 6, generator=g, dtype=F64), torch.randint(0, 2, (a,), generator=g),
                            torch.randn(m, 6, generator=g, dtype=F64), torch.zeros(m, dtype=torch.int64))
        expected, _ = _literal(case, **kw)
        got = pk.pixel_contrast_loss(*_cast(case, dtype).args(), **kw, reduction="none")
        assert_close(got, expected, tol)


def test_custom_ignore_index_and_validate_false(contrast_backend):
    dtype, tol = _exact_dtype(contrast_backend)
    case = _cast(make_contrast_case(40, 50, 7, 4, "bank", seed=8), dtype)
    labels, bank_labels = case.anchor_labels.clone(), case.contrast_labels.clone()
    labels[labels == -1] = 3  # 3 marks ignored entries, though it looks like a class
    bank_labels[bank_labels == -1] = 3
    kw = dict(ignore_index=3, reduction="none", **KW)
    got = pk.pixel_contrast_loss(case.anchors, labels, case.contrast, bank_labels, **kw)
    expected, _ = literal_pixel_contrast(case.anchors, labels, case.contrast, bank_labels, ignore_index=3, **KW)
    assert_close(got, expected, tol)
    assert bool((got[labels == 3] == 0).all())
    # validate=False: a negative label other than ignore_index takes no part, like ignore_index.
    odd = labels.clone()
    odd[:5] = -7
    cleaned = odd.clone()
    cleaned[:5] = 3
    a = pk.pixel_contrast_loss(case.anchors, odd, case.contrast, bank_labels, validate=False, **kw)
    b = pk.pixel_contrast_loss(case.anchors, cleaned, case.contrast, bank_labels, **kw)
    assert torch.equal(a, b)


def test_small_temperature_stays_finite(contrast_backend):
    """τ = 1e-3: logits up to ±1000, where e^ℓ overflows even float64."""
    for mode in MODES:
        case = make_contrast_case(30, 40, 8, 3, mode, seed=9, dtype=torch.float32)
        for denominator in DENOMINATORS:
            kw = dict(temperature=1e-3, base_temperature=0.07, denominator=denominator)
            anchors = case.anchors.clone().requires_grad_()
            loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, case.contrast, case.contrast_labels,
                                          **kw, reduction="none")
            loss.sum().backward()
            assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(anchors.grad).all())
            expected, _ = _literal(case, **kw)
            assert_close(loss, expected, 1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_anchors_without_positive_stay_finite_at_small_temperature(contrast_backend, normalize):
    """Found by tests/fuzz.py: an anchor without a positive has w = 0 but e^ℓ = inf at
    τ = 1e-3, and 0·inf made its gradient row NaN (triton)."""
    for mode in MODES:
        case = make_contrast_case(16, 40, 24, 6, mode, seed=100097, dtype=torch.float32)
        anchors = F.normalize(case.anchors, dim=1).requires_grad_()
        contrast = None if case.contrast is None else F.normalize(case.contrast, dim=1)
        loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, contrast, case.contrast_labels,
                                      temperature=1e-3, base_temperature=1e-3, normalize=normalize)
        loss.backward()
        assert torch.isfinite(loss) and bool(torch.isfinite(anchors.grad).all()), mode


def test_nan_in_gives_nan_out(contrast_backend):
    for mode in MODES:
        case = make_contrast_case(20, 30, 5, 3, mode, seed=10, dtype=torch.float32)
        anchors = case.anchors.clone()
        taking_part = int((case.anchor_labels >= 0).nonzero()[0, 0])
        anchors[taking_part, 2] = math.nan
        loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, case.contrast, case.contrast_labels)
        assert math.isnan(float(loss))


# ---- empty and excluded ----------------------------------------------------------

def _empty_cases():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(17, 6, generator=g)
    bank = torch.randn(23, 6, generator=g)
    return {
        "all anchors ignored": (x, torch.full((17,), -1), bank, torch.randint(0, 3, (23,), generator=g)),
        "bank empty": (x, torch.randint(0, 3, (17,), generator=g), bank, torch.full((23,), -1)),
        "no shared class": (x, torch.zeros(17, dtype=torch.int64), bank, torch.ones(23, dtype=torch.int64)),
        "in-batch all distinct": (x[:3], torch.tensor([0, 1, 2]), None, None),
        "A = 0": (x[:0], torch.zeros(0, dtype=torch.int64), bank, torch.zeros(23, dtype=torch.int64)),
        "M = 0": (x, torch.zeros(17, dtype=torch.int64), bank[:0], torch.zeros(0, dtype=torch.int64)),
        "in-batch A = 0": (x[:0], torch.zeros(0, dtype=torch.int64), None, None),
    }


@pytest.mark.parametrize("name", list(_empty_cases()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_no_positive_anywhere_gives_zero_loss_and_zero_gradient(name, reduction, denominator, contrast_backend):
    x, labels, bank, bank_labels = _empty_cases()[name]
    x = x.clone().requires_grad_()
    bank = None if bank is None else bank.clone().requires_grad_()
    loss = pk.pixel_contrast_loss(x, labels, bank, bank_labels, denominator=denominator, reduction=reduction)
    assert loss.shape == ((x.shape[0],) if reduction == "none" else ())
    assert bool((loss == 0).all())
    loss.sum().backward()
    assert bool((x.grad == 0).all())
    assert bank is None or bool((bank.grad == 0).all())


def test_constant_bank_gets_no_gradient(contrast_backend):
    case = make_contrast_case(20, 30, 5, 3, "bank", seed=12, dtype=torch.float32)
    anchors = case.anchors.clone().requires_grad_()
    pk.pixel_contrast_loss(anchors, case.anchor_labels, case.contrast, case.contrast_labels).backward()
    assert case.contrast.grad is None and float(anchors.grad.norm()) > 0


# ---- gradcheck, registration, compile ----------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(mode, denominator, normalize, contrast_backend):
    if _exact_dtype(contrast_backend)[0] != F64:
        pytest.skip(f"the {contrast_backend} backend does not compute in float64")
    case = make_contrast_case(11, 13, 4, 3, mode, seed=13)
    kw = dict(temperature=0.5, base_temperature=0.07, normalize=normalize, denominator=denominator,
              reduction="none")
    inputs = [case.anchors.clone().requires_grad_()]
    if case.contrast is not None:
        inputs.append(case.contrast.clone().requires_grad_())

    def fn(anchors, contrast=None):
        return pk.pixel_contrast_loss(anchors, case.anchor_labels, contrast, case.contrast_labels, **kw)

    assert torch.autograd.gradcheck(fn, tuple(inputs))


def _op_args(mode: str, supcon: bool, backend: str = "reference") -> tuple:
    case = make_contrast_case(23, 31, 6, 3, mode, seed=14, dtype=torch.float32)
    return (*case.args(), True, 0.1, 0.07, supcon, -1, True, backend)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("supcon", [False, True])
def test_opcheck(mode, supcon, contrast_backend):
    ops = torch.ops.protoseg
    args = _op_args(mode, supcon, contrast_backend)
    anchors = args[0].clone().requires_grad_()
    contrast = None if args[2] is None else args[2].clone().requires_grad_()
    torch.library.opcheck(ops.pixel_contrast_loss.default, (anchors, args[1], contrast, *args[3:]))
    _, positives, log_norm, log_b = ops.pixel_contrast_loss(*args)
    grad = torch.randn(anchors.shape[0])
    for need_contrast_grad in (True, False):
        torch.library.opcheck(
            ops.pixel_contrast_loss_backward.default,
            (grad, *args[:4], positives, log_norm, log_b, True, 0.1, 0.07, supcon, -1, need_contrast_grad,
             contrast_backend),
        )


def contrast_step(anchors, labels, bank, bank_labels):
    in_batch = pk.pixel_contrast_loss(anchors, labels)
    against_bank = pk.pixel_contrast_loss(anchors, labels, bank, bank_labels, temperature=0.07,
                                          denominator="supcon", validate=False)
    return in_batch + against_bank


def test_torch_compile_fullgraph(contrast_backend):
    case = make_contrast_case(50, 70, 8, 4, "bank", seed=15, dtype=torch.float32)
    compiled = torch.compile(contrast_step, fullgraph=True)
    results = []
    for fn in (compiled, contrast_step):
        anchors = case.anchors.clone().requires_grad_()
        bank = case.contrast.clone().requires_grad_()
        loss = fn(anchors, case.anchor_labels, bank, case.contrast_labels)
        loss.backward()
        results.append((loss, anchors.grad, bank.grad))
    for name, got, want in zip(("loss", "d anchors", "d bank"), *results):
        assert_close(got, want, 1e-6, name)


# ---- fused backends against the float64 reference -----------------------------------

def _fused_contrast_shapes(backend: str) -> list[tuple[int, int, int, int]]:
    """(A, M, D, classes): ragged, with several row and column tiles on every backend; the
    interpreted and emulated backends get smaller ones."""
    if backend in ("triton", "cuda_emulated"):
        return [(67, 91, 13, 5), (45, 130, 40, 3), (1, 17, 5, 2)]
    return [(1031, 4099, 77, 19), (257, 129, 33, 7), (1, 300, 9, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_fused_backend_matches_reference(fused_backend, dtype, mode, denominator):
    for i, (a, m, d, classes) in enumerate(_fused_contrast_shapes(fused_backend)):
        case = make_contrast_case(a, m, d, classes, mode, seed=40 + i, dtype=torch.float32)
        check_pixel_contrast_loss(fused_backend, case, dtype, denominator=denominator, contrast_grad=i % 2 == 0)


@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_fused_backend_bank_stored_by_class(fused_backend, denominator):
    """A bank sorted by label (as a class memory bank stores it) and anchors in random
    order: column blocks then hold one or two classes, so a backend that skips the blocks
    without positives in its second pass (cpu) does skip, and must still match."""
    a, m, d, classes = _fused_contrast_shapes(fused_backend)[0]
    case = make_contrast_case(a, m, d, classes, "bank", seed=60, dtype=torch.float32)
    order = torch.argsort(case.contrast_labels, stable=True)
    case.contrast, case.contrast_labels = case.contrast[order], case.contrast_labels[order]
    check_pixel_contrast_loss(fused_backend, case, torch.float32, denominator=denominator)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_fused_backend_unnormalized(fused_backend, mode, denominator):
    a, m, d, classes = _fused_contrast_shapes(fused_backend)[1]
    case = make_contrast_case(a, m, d, classes, mode, seed=50, dtype=torch.float32)
    case.anchors, case.contrast = case.anchors / 4, None if case.contrast is None else case.contrast / 4
    check_pixel_contrast_loss(fused_backend, case, torch.float32, denominator=denominator, normalize=False,
                              temperature=2.0)


@pytest.mark.parametrize("mode", MODES)
def test_fused_backend_allocates_nothing_of_size_a_by_m(fused_backend, mode):
    """The probe that sees the reference's A×M logits (test below) sees nothing of A·M
    elements here, forward or backward, with a bank gradient too."""
    small = fused_backend != "cpu"
    a, m = ((40, 300) if small else (64, 1000)) if mode == "bank" else ((300, 0) if small else (600, 0))
    case = make_contrast_case(a, m, 16, 5, mode, seed=22, dtype=torch.float32)
    anchors = case.anchors.clone().requires_grad_()
    bank = None if case.contrast is None else case.contrast.clone().requires_grad_()
    columns = a if bank is None else m
    for denominator in DENOMINATORS:
        loss = None

        def forward(denominator=denominator):
            nonlocal loss
            loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, bank, case.contrast_labels,
                                          denominator=denominator)

        with pk.use_backend(fused_backend):
            a_by_m = a * columns * 4  # fp32 bytes
            assert largest_allocation(forward) < a_by_m, "forward"
            assert largest_allocation(loss.backward) < a_by_m, "backward"


# ---- bad inputs --------------------------------------------------------------------

def _good() -> dict:
    case = make_contrast_case(12, 15, 5, 3, "bank", seed=16, dtype=torch.float32)
    return dict(anchors=case.anchors, anchor_labels=case.anchor_labels, contrast=case.contrast,
                contrast_labels=case.contrast_labels)


BAD_INPUTS = [
    (dict(anchors=torch.randn(12)), ValueError, ["anchors", "[A, D]", "(12,)"]),
    (dict(anchors=torch.randint(0, 3, (12, 5))), TypeError, ["anchors", "floating", "int64"]),
    (dict(anchors=[[0.0] * 5] * 12), TypeError, ["anchors", "torch.Tensor", "list"]),
    (dict(anchors=torch.randn(12, 0)), ValueError, ["anchors", "D > 0"]),
    (dict(anchor_labels=torch.zeros(11, dtype=torch.int64)), ValueError, ["anchor_labels", "[A]", "(11,)"]),
    (dict(anchor_labels=torch.zeros(12)), TypeError, ["anchor_labels", "integer", "float32"]),
    (dict(anchor_labels=torch.zeros(12, dtype=torch.int64, device="meta")), ValueError,
     ["anchor_labels", "device", "cpu"]),
    (dict(anchor_labels=torch.full((12,), -5)), ValueError, ["anchor_labels", ">= 0", "found -5", "validate=False"]),
    (dict(contrast=torch.randn(15, 6)), ValueError, ["contrast", "D = 5", "(15, 6)"]),
    (dict(contrast=torch.randn(15, 5, 1)), ValueError, ["contrast", "[M, D]"]),
    (dict(contrast=torch.randn(15, 5, dtype=F64)), TypeError, ["contrast", "dtype", "float32", "float64"]),
    (dict(contrast=torch.randn(15, 5, device="meta")), ValueError, ["contrast", "device"]),
    (dict(contrast=torch.randint(0, 2, (15, 5))), TypeError, ["contrast", "floating"]),
    (dict(contrast_labels=None), ValueError, ["contrast_labels", "[M]"]),
    (dict(contrast=None), ValueError, ["contrast_labels", "without contrast"]),
    (dict(contrast_labels=torch.zeros(14, dtype=torch.int64)), ValueError, ["contrast_labels", "[M]", "(14,)"]),
    (dict(contrast_labels=torch.zeros(15, dtype=torch.bool)), TypeError, ["contrast_labels", "integer", "bool"]),
    (dict(contrast_labels=torch.full((15,), -2)), ValueError, ["contrast_labels", "found -2"]),
    (dict(kw=dict(temperature=0.0)), ValueError, ["temperature", "positive"]),
    (dict(kw=dict(temperature=math.inf)), ValueError, ["temperature"]),
    (dict(kw=dict(temperature="0.1")), TypeError, ["temperature", "float", "str"]),
    (dict(kw=dict(base_temperature=-0.07)), ValueError, ["base_temperature", "positive"]),
    (dict(kw=dict(base_temperature=math.nan)), ValueError, ["base_temperature"]),
    (dict(kw=dict(denominator="infonce")), ValueError, ["denominator", "'contrastiveseg'", "'supcon'"]),
    (dict(kw=dict(reduction="max")), ValueError, ["reduction", "'mean'", "'max'"]),
    (dict(kw=dict(normalize=1)), TypeError, ["normalize", "bool"]),
    (dict(kw=dict(ignore_index=-1.0)), TypeError, ["ignore_index", "int"]),
    (dict(kw=dict(validate=None)), TypeError, ["validate", "bool"]),
]


@pytest.mark.parametrize("changes,exc,words", BAD_INPUTS, ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_bad_inputs_name_the_argument(changes, exc, words):
    args = _good()
    kw = changes.pop("kw", {}) if "kw" in changes else {}
    args.update(changes)
    with pytest.raises(exc) as info:
        pk.pixel_contrast_loss(args["anchors"], args["anchor_labels"], args["contrast"], args["contrast_labels"], **kw)
    message = str(info.value)
    assert message.startswith("pixel_contrast_loss:"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_auto_serves_the_fused_cpu_backend():
    """The public path is the fused one: auto picks the cpu kernels for CPU tensors (a
    backend lacking an op is refused by name: tests/test_op_inventory.py)."""
    require_backend("cpu", "pixel_contrast_loss")
    for dtype in (torch.float32, F64, torch.bfloat16):
        assert resolve_backend("pixel_contrast_loss", torch.device("cpu"), dtype) == "cpu"


def test_non_contiguous_inputs_and_narrow_label_dtypes(contrast_backend):
    dtype, tol = _exact_dtype(contrast_backend)
    case = _cast(make_contrast_case(40, 50, 7, 4, "bank", seed=20), dtype)
    # Every other row and column of wider, transposed storage.
    wide_anchors = torch.zeros(14, 80, dtype=dtype)
    wide_anchors[::2, ::2] = case.anchors.T
    wide_bank = torch.zeros(14, 100, dtype=dtype)
    wide_bank[::2, ::2] = case.contrast.T
    anchors, bank = wide_anchors[::2, ::2].T, wide_bank[::2, ::2].T
    assert not anchors.is_contiguous() and not bank.is_contiguous()
    got = pk.pixel_contrast_loss(anchors, case.anchor_labels.to(torch.int32), bank,
                                 case.contrast_labels.to(torch.int16), reduction="none")
    want = pk.pixel_contrast_loss(*case.args(), reduction="none")
    assert_close(got, want, tol * 1e-2)  # the GEMM may sum in another order for strided inputs


def test_allocation_probe_sees_the_reference_a_by_m_tensors(reference_backend):
    """Companion of the fused backends' probe (nothing of size A·M): the probe does see the
    reference's A×M logits, forward and backward."""
    a, m = 64, 1000
    case = make_contrast_case(a, m, 16, 5, "bank", seed=22, dtype=torch.float32)
    anchors = case.anchors.clone().requires_grad_()
    loss = None

    def forward():
        nonlocal loss
        loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, case.contrast, case.contrast_labels)

    a_by_m = a * m * 4  # fp32 bytes
    assert largest_allocation(forward) >= a_by_m
    assert largest_allocation(loss.backward) >= a_by_m


# ---- dtypes and determinism ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_half_inputs_accumulate_in_fp32(dtype, mode, contrast_backend):
    case = make_contrast_case(70, 90, 24, 4, mode, seed=18, dtype=dtype)
    anchors = case.anchors.clone().requires_grad_()
    loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, case.contrast, case.contrast_labels,
                                  reduction="none")
    loss.sum().backward()
    assert loss.dtype == torch.float32 and anchors.grad.dtype == dtype
    # The same (rounded) inputs in float64: fp32 accumulation is within the fp32 rule.
    exact = make_contrast_case(70, 90, 24, 4, mode, seed=18, dtype=dtype)
    exact.anchors = exact.anchors.to(F64).requires_grad_()
    exact.contrast = None if exact.contrast is None else exact.contrast.to(F64)
    with pk.use_backend("reference"):
        want = pk.pixel_contrast_loss(*exact.args(), reduction="none")
        want.sum().backward()
    assert_close(loss, want, 1e-5, "loss")
    # The gradient is rounded to the inputs' dtype once, at the end.
    rounding = relative_error(exact.anchors.grad.to(dtype), exact.anchors.grad)
    assert_close(anchors.grad, exact.anchors.grad, rounding + 1e-5, "d anchors")


@pytest.mark.parametrize("mode", MODES)
def test_deterministic(mode, contrast_backend):
    case = make_contrast_case(300, 500, 33, 7, mode, seed=19, dtype=torch.float32)

    def run():
        anchors = case.anchors.clone().requires_grad_()
        contrast = None if case.contrast is None else case.contrast.clone().requires_grad_()
        loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, contrast, case.contrast_labels)
        loss.backward()
        return loss, anchors.grad, None if contrast is None else contrast.grad

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)
