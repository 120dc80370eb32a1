"""Bad inputs: every argument of every op gets a clear error naming it (docs/spec.md §3, §5),
and out-of-range values are either rejected or, with validate=False, ignored."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_case

import protoseg_kernels as pk

N, D, C, K = 12, 5, 3, 4


def _good():
    case = make_case(N, D, C, K, dtype=torch.float32, ignore_fraction=0.2)
    return dict(
        x=case.x, prototypes=case.prototypes, labels=case.labels, target=case.target,
        index=case.index, q=torch.rand(N, K),
    )


def _call(op: str, **changes):
    g = _good()
    g.update(changes)
    if op == "prototype_similarity":
        return pk.prototype_similarity(g["x"], g["prototypes"], **g.get("kw", {}))
    if op == "class_scores":
        return pk.class_scores(g["x"], g["prototypes"], **g.get("kw", {}))
    if op == "ppc_ppd_loss":
        return pk.ppc_ppd_loss(g["x"], g["prototypes"], g["target"], **g.get("kw", {}))
    if op == "sinkhorn_assign":
        return pk.sinkhorn_assign(g["x"], g["prototypes"], g["labels"], **g.get("kw", {}))
    if op == "update_prototypes":
        return pk.update_prototypes(g["prototypes"], g["x"], g["labels"], g["index"], **g.get("kw", {}))
    if op == "gumbel_index":
        return pk.gumbel_index(g["q"], **g.get("kw", {}))
    raise AssertionError(op)


FEATURE_OPS = ["prototype_similarity", "class_scores", "ppc_ppd_loss", "sinkhorn_assign", "update_prototypes"]

# (changes, exception, words the message must contain)
COMMON_CASES = [
    (dict(x=torch.randn(N, D, 2)), ValueError, ["x", "[N, D]", "(12, 5, 2)"]),
    (dict(x=torch.randn(N)), ValueError, ["x", "[N, D]"]),
    (dict(x=torch.randint(0, 5, (N, D))), TypeError, ["x", "floating", "int64"]),
    (dict(x=[[1.0] * D] * N), TypeError, ["x", "torch.Tensor", "list"]),
    (dict(x=torch.randn(N, 0)), ValueError, ["x", "D > 0"]),
    (dict(x=torch.randn(N, D).t()), ValueError, ["x must be [N, D] with D = 5", "(5, 12)", "transposed"]),
    (dict(prototypes=torch.randn(C, D)), ValueError, ["prototypes", "[C, K, D]"]),
    (dict(prototypes=torch.randn(C, K, D + 1)), ValueError, ["prototypes", "D = 5", "(3, 4, 6)"]),
    (dict(prototypes=torch.randn(0, K, D)), ValueError, ["prototypes", "C > 0"]),
    (dict(prototypes=torch.randn(C, 0, D)), ValueError, ["prototypes", "K > 0"]),
    (dict(prototypes=torch.randint(0, 3, (C, K, D))), TypeError, ["prototypes", "floating"]),
    (dict(prototypes=torch.randn(C, K, D, device="meta")), ValueError, ["prototypes", "device", "cpu"]),
    (dict(kw=dict(normalize=1)), TypeError, ["normalize", "bool", "int"]),
]


@pytest.mark.parametrize("op", FEATURE_OPS)
@pytest.mark.parametrize("changes,exc,words", COMMON_CASES, ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_feature_and_prototype_arguments(op, changes, exc, words):
    with pytest.raises(exc) as info:
        _call(op, **changes)
    message = str(info.value)
    assert message.startswith(op + ":"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def _index_cases(name: str, upper: int, meaning: str):
    return [
        (name, torch.zeros(N, dtype=torch.float32), TypeError, [name, "integer", "float32"]),
        (name, torch.zeros(N + 1, dtype=torch.int64), ValueError, [name, "[N]", "(13,)"]),
        (name, torch.zeros(N, 1, dtype=torch.int64), ValueError, [name, "[N]"]),
        (name, torch.zeros(N, dtype=torch.int64, device="meta"), ValueError, [name, "device"]),
        (name, torch.full((N,), upper), ValueError, [name, meaning, f"[0, {upper})", f"found {upper}"]),
        (name, torch.full((N,), -5), ValueError, [name, "found -5", "validate=False"]),
    ]


INDEX_CASES = (
    [("ppc_ppd_loss",) + c for c in _index_cases("target", C * K, "flat prototype indices")]
    + [("sinkhorn_assign",) + c for c in _index_cases("labels", C, "class indices")]
    + [("update_prototypes",) + c for c in _index_cases("labels", C, "class indices")]
    + [("update_prototypes",) + c for c in _index_cases("index", K, "prototype indices")]
)


def _case_id(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else str(value)[:30]


@pytest.mark.parametrize("op,name,value,exc,words", INDEX_CASES, ids=_case_id)
def test_index_arguments(op, name, value, exc, words):
    with pytest.raises(exc) as info:
        _call(op, **{name: value})
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


SCALAR_CASES = [
    ("class_scores", dict(reduction="mean"), ValueError, ["reduction", "'max'", "'mean'"]),
    ("class_scores", dict(temperature=0.0), ValueError, ["temperature", "positive"]),
    ("class_scores", dict(temperature=math.nan), ValueError, ["temperature"]),
    ("class_scores", dict(temperature="1"), TypeError, ["temperature", "float", "str"]),
    ("class_scores", dict(lse_temperature=-1.0), ValueError, ["lse_temperature"]),
    ("class_scores", dict(lse_temperature=math.inf), ValueError, ["lse_temperature"]),
    ("class_scores", dict(return_index=None), TypeError, ["return_index", "bool"]),
    ("ppc_ppd_loss", dict(temperature=-0.1), ValueError, ["temperature"]),
    ("ppc_ppd_loss", dict(reduction="max"), ValueError, ["reduction", "'mean'"]),
    ("ppc_ppd_loss", dict(ignore_index=1.5), TypeError, ["ignore_index", "int"]),
    ("ppc_ppd_loss", dict(validate="yes"), TypeError, ["validate", "bool"]),
    ("sinkhorn_assign", dict(epsilon=0.0), ValueError, ["epsilon", "positive"]),
    ("sinkhorn_assign", dict(epsilon=-0.05), ValueError, ["epsilon"]),
    ("sinkhorn_assign", dict(epsilon=math.inf), ValueError, ["epsilon"]),
    ("sinkhorn_assign", dict(epsilon=math.nan), ValueError, ["epsilon"]),
    ("sinkhorn_assign", dict(iterations=-1), ValueError, ["iterations", ">= 0", "-1"]),
    ("sinkhorn_assign", dict(iterations=2.0), TypeError, ["iterations", "int"]),
    ("sinkhorn_assign", dict(return_q=0), TypeError, ["return_q", "bool"]),
    ("sinkhorn_assign", dict(ignore_index=None), TypeError, ["ignore_index"]),
    ("sinkhorn_assign", dict(validate=None), TypeError, ["validate"]),
    ("sinkhorn_assign", dict(process_group=object()), RuntimeError, ["process_group", "init_process_group"]),
    ("update_prototypes", dict(momentum=1.5), ValueError, ["momentum", "[0, 1]", "1.5"]),
    ("update_prototypes", dict(momentum=-0.1), ValueError, ["momentum"]),
    ("update_prototypes", dict(momentum=math.nan), ValueError, ["momentum"]),
    ("update_prototypes", dict(mask=torch.ones(N, dtype=torch.int64)), TypeError, ["mask", "bool"]),
    ("update_prototypes", dict(mask=torch.ones(N - 1, dtype=torch.bool)), ValueError, ["mask", "[N]"]),
    ("update_prototypes", dict(mask=torch.ones(N, dtype=torch.bool, device="meta")), ValueError, ["mask", "device"]),
    ("update_prototypes", dict(ignore_index="x"), TypeError, ["ignore_index"]),
    ("update_prototypes", dict(validate=1), TypeError, ["validate"]),
    ("update_prototypes", dict(process_group=object()), RuntimeError, ["process_group"]),
    ("prototype_similarity", dict(normalize=None), TypeError, ["normalize"]),
    ("gumbel_index", dict(generator=3), TypeError, ["generator", "torch.Generator"]),
]


@pytest.mark.parametrize("op,kw,exc,words", SCALAR_CASES, ids=lambda v: str(v)[:30])
def test_scalar_arguments(op, kw, exc, words):
    with pytest.raises(exc) as info:
        _call(op, kw=kw)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("q,exc", [(torch.rand(N), ValueError), (torch.randint(0, 2, (N, K)), TypeError)])
def test_gumbel_q_argument(q, exc):
    with pytest.raises(exc, match="gumbel_index: q"):
        pk.gumbel_index(q)


def test_validate_false_treats_out_of_range_as_ignored():
    g = _good()
    x, p = g["x"], g["prototypes"]
    bad_labels = g["labels"].clone()
    bad_labels[:4] = torch.tensor([C, 99, -7, -1])
    clean_labels = bad_labels.clone()
    clean_labels[:4] = -1
    a = pk.sinkhorn_assign(x, p, bad_labels, validate=False, return_q=True)
    b = pk.sinkhorn_assign(x, p, clean_labels, return_q=True)
    assert torch.equal(a.index, b.index) and torch.equal(a.q, b.q)
    assert bool((a.index[:4] == -1).all())

    bad_target = g["target"].clone()
    bad_target[:3] = torch.tensor([C * K, -3, 1000])
    clean_target = bad_target.clone()
    clean_target[:3] = -1
    la = pk.ppc_ppd_loss(x, p, bad_target, validate=False, reduction="none")
    lb = pk.ppc_ppd_loss(x, p, clean_target, reduction="none")
    assert torch.equal(la.ppc, lb.ppc) and torch.equal(la.ppd, lb.ppd)

    bad_index = g["index"].clone()
    bad_index[:3] = torch.tensor([K, 50, -9])
    clean_index = bad_index.clone()
    clean_index[:3] = -1
    ua = pk.update_prototypes(p, x, bad_labels, bad_index, validate=False)
    ub = pk.update_prototypes(p, x, clean_labels, clean_index)
    assert torch.equal(ua.prototypes, ub.prototypes) and torch.equal(ua.counts, ub.counts)


def test_integer_dtypes_accepted_for_indices():
    g = _good()
    labels32 = g["labels"].to(torch.int32)
    a = pk.sinkhorn_assign(g["x"], g["prototypes"], labels32)
    b = pk.sinkhorn_assign(g["x"], g["prototypes"], g["labels"])
    assert torch.equal(a.index, b.index)
    loss = pk.ppc_ppd_loss(g["x"], g["prototypes"], g["target"].to(torch.int16))
    assert torch.isfinite(loss.ppc)


SCALES = [("class_scores", "temperature"), ("class_scores", "lse_temperature"), ("ppc_ppd_loss", "temperature"),
          ("sinkhorn_assign", "epsilon")]


@pytest.mark.parametrize("op,name", SCALES)
@pytest.mark.parametrize("value", [1e-39, 1e300, 1e38])
def test_scales_outside_the_compute_dtype_range_are_rejected(op, name, value):
    """1e-39 (subnormal in fp32, its reciprocal inf), 1e300 (inf in fp32) and 1e38 (whose
    reciprocal is subnormal) would turn every output into 0, inf or NaN."""
    with pytest.raises(ValueError, match=rf"{name} must be in \[.*\] for torch.float32 inputs"):
        _call(op, kw={name: value})


@pytest.mark.parametrize("op,name", SCALES)
def test_fp64_inputs_accept_the_fp64_range(op, name):
    g = _good()
    x, prototypes = g["x"].double(), g["prototypes"].double()
    _call(op, x=x, prototypes=prototypes, kw={name: 1e-39})  # normal in fp64: accepted
    with pytest.raises(ValueError, match=rf"{name} must be in .* for torch.float64 inputs"):
        _call(op, x=x, prototypes=prototypes, kw={name: 1e-320})


@pytest.mark.parametrize("name", ["temperature", "base_temperature"])
def test_contrast_temperatures_outside_the_range_are_rejected(name):
    anchors, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, -1])
    with pytest.raises(ValueError, match=rf"{name} must be in \[.*\] for torch.bfloat16 inputs"):
        pk.pixel_contrast_loss(anchors.bfloat16(), labels, **{name: 1e39})


def test_update_prototypes_checks_the_index_of_labelled_pixels_only():
    g = _good()
    labels = torch.full((N,), 255)
    labels[:3] = torch.tensor([0, 1, 2])
    index = torch.full((N,), 99)  # out of range, but on ignored pixels only...
    index[:3] = torch.tensor([0, 1, -1])
    out = pk.update_prototypes(g["prototypes"], g["x"], labels, index, ignore_index=255)
    assert out.counts.sum() == 2
    index[1] = K  # ...until a labelled pixel holds one
    with pytest.raises(ValueError, match=rf"index must hold prototype indices in \[0, {K}\) or -1 \(unassigned\), "
                                         rf"found {K}"):
        pk.update_prototypes(g["prototypes"], g["x"], labels, index, ignore_index=255)


def test_update_prototypes_names_swapped_arguments():
    g = _good()
    with pytest.raises(ValueError, match=r"update_prototypes: .*the prototypes come first"):
        pk.update_prototypes(g["x"], g["prototypes"], g["labels"], g["index"])


def test_one_ignore_index_default_for_ops_heads_losses_and_datasets():
    import inspect

    import protoseg
    from protoseg.data import IGNORE_INDEX
    assert pk.IGNORE_INDEX == IGNORE_INDEX == -1
    takers = [getattr(pk, name) for name in pk.__all__] + [protoseg.ProtoSegHead, protoseg.ContrastHead,
                                                          protoseg.HSSNHead, protoseg.PixelPrototypeCELoss]
    defaults = {}
    for taker in takers:
        target = taker.__init__ if inspect.isclass(taker) else taker
        if callable(target) and "ignore_index" in inspect.signature(target).parameters:
            defaults[taker.__name__] = inspect.signature(target).parameters["ignore_index"].default
    assert len(defaults) >= 12 and set(defaults.values()) == {pk.IGNORE_INDEX}, defaults
