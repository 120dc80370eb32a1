"""Differential fuzzer: random cases of every fused op on every fused backend against the
float64 reference (docs/spec.md §5).

Each case draws an op, a backend, a ragged shape (N or A: 0, or from 16 for the finite
checks and from 1 for the others; D, C, K from 1), a dtype
(fp32, fp16, bf16; fp64 where the backend computes in it), options (normalize, reduction,
temperatures, iterations, denominator, in-batch or bank, focal γ, [N, V] or image logits
on a hierarchy of up to three levels) and a layout (contiguous, a
transposed view, a strided slice), then one of three checks:

* ``finite``: the conformance rules of tests/conformance.py (values, gradients, indices);
* ``hostile``: labels, targets and indices far out of range or negative, with
  ``validate=False``: the result must be exactly that of the same backend on the inputs with
  those entries set to ignored (nothing read out of bounds, nothing counted);
* ``nan``: a few NaN entries in the features (the logits of tree_min_loss): the outputs must be NaN exactly where the
  reference's are (NaN is never hidden, never spread);
* ``inf``: the same with +inf or −inf entries: NaN, +inf and −inf exactly where the reference
  has them (docs/spec.md §3, "Non-finite inputs": with ``normalize=True`` an infinite entry
  makes its row NaN; raw similarities follow IEEE arithmetic and torch.logsumexp's rule).

One case in ten is a hostile check of an op with a single device-side implementation
(tree_triplet_loss, sample_anchors): out-of-range labels with ``validate=False`` must give
exactly the result of the same labels ignored.

``python tests/fuzz.py --seconds 600`` (``make fuzz``) runs a longer campaign; the test
suite runs tests/test_fuzz.py, a fixed seed under a time budget.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if not torch.cuda.is_available():  # as tests/conftest.py: triton through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import conformance  # noqa: E402
from contrast_cases import make_contrast_case  # noqa: E402
from helpers import make_case  # noqa: E402

import protoseg_kernels as pk  # noqa: E402
from protoseg_kernels._backend import op_dtype_reason, unavailable_reason  # noqa: E402

FUSED = ("cpu", "triton", "cuda_emulated")
OPS = ("prototype_similarity", "class_scores", "ppc_ppd_loss", "sinkhorn_assign", "update_prototypes",
       "pixel_contrast_loss", "tree_min_loss")
# Ops with one device-side PyTorch implementation: drawn for the hostile check only.
SINGLE_IMPLEMENTATION = ("tree_triplet_loss", "sample_anchors")
CHECKS = ("finite", "finite", "hostile", "nan", "inf")  # finite twice as often
NAN = float("nan")


@dataclass
class FuzzCase:
    op: str
    backend: str
    dtype: torch.dtype
    check: str
    shape: tuple[int, int, int, int]  # (N, D, C, K); pixel contrast: (A, D, classes, M)
    layout: str
    options: dict = field(default_factory=dict)
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.op} on {self.backend}, {self.check}, {str(self.dtype).removeprefix('torch.')}, "
                f"shape {self.shape}, layout {self.layout}, options {self.options}, seed {self.seed}")


def usable_backends(requested: tuple[str, ...] = FUSED) -> list[str]:
    """The fused backends that run on CPU tensors here."""
    from protoseg_kernels._backend import get_backend

    usable = []
    for name in requested:
        if unavailable_reason(name) is None and get_backend(name).device_reason(torch.device("cpu")) is None:
            usable.append(name)
    return usable


def draw_case(rng: random.Random, backends: list[str], seed: int) -> FuzzCase | None:
    if rng.random() < 0.1:
        return _draw_single_implementation_case(rng, seed)
    op, backend, check = rng.choice(OPS), rng.choice(backends), rng.choice(CHECKS)
    if check == "hostile" and op in ("prototype_similarity", "class_scores"):
        check = "finite"  # no index argument
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64])
    if op_dtype_reason(backend, op, dtype) is not None:
        return None  # e.g. triton does not compute in float64
    small = backend == "triton"  # interpreted: keep it quick
    # The finite checks compare relative errors over all N outputs; on a handful of them one
    # cancellation (ppc = lse − s/τ near 0) dominates the norm, so they start at N = 16.
    low = 16 if check == "finite" else 1
    n = rng.choice([0, low, rng.randint(low, 40 if small else 200)])
    # D = 1 with normalize: every gradient is 0 up to rounding, so relative errors mean nothing
    d_low = 2 if check == "finite" else 1
    shape = (n, rng.randint(d_low, 24 if small else 48), rng.randint(1, 6), rng.randint(1, 5))
    options = {"normalize": rng.random() < 0.7}
    if op == "class_scores":
        options.update(reduction=rng.choice(["max", "logsumexp"]), temperature=rng.choice([0.05, 0.5, 1.0]),
                       lse_temperature=rng.choice([None, 0.1, 1.0]))
    elif op == "ppc_ppd_loss":
        options.update(temperature=rng.choice([0.05, 0.1, 1.0]))
    elif op == "sinkhorn_assign":
        options.update(epsilon=rng.choice([0.05, 0.1, 0.5]), iterations=rng.choice([0, 1, 3]))
    elif op == "update_prototypes":
        options.update(momentum=rng.choice([0.0, 0.5, 0.99]))
    elif op == "pixel_contrast_loss":
        mode = rng.choice(["in_batch", "bank"])
        # one class: every entry a positive, and SupCon's gradient softmax − 1/|P| cancels
        # below fp32's 1e-5 relative accuracy; the finite checks start at two classes
        classes = rng.randint(2 if check == "finite" else 1, 6)
        shape = (n, shape[1], classes, 0 if mode == "in_batch" else rng.randint(0, 60 if small else 150))
        options.update(mode=mode, denominator=rng.choice(["contrastiveseg", "supcon"]),
                       temperature=rng.choice([0.07, 0.1, 0.5]))
    elif op == "tree_min_loss":  # C leaves of conformance.hierarchy_for(C): up to three levels
        options.update(focal_gamma=rng.choice([None, 0.5, 2.0]), image=rng.random() < 0.5)
    layout = rng.choice(["contiguous", "transposed", "strided"])
    return FuzzCase(op, backend, dtype, check, shape, layout, options, seed)


def _draw_single_implementation_case(rng: random.Random, seed: int) -> FuzzCase:
    """A hostile-index case of an op with one device-side PyTorch implementation (nothing to
    compare across backends, but validate=False must still ignore out-of-range labels)."""
    op = rng.choice(SINGLE_IMPLEMENTATION)
    shape = (rng.choice([0, rng.randint(1, 300)]), rng.randint(1, 16), rng.randint(1, 6), 0)
    options = {"selection": rng.choice(["first", "random"])} if op == "tree_triplet_loss" else {
        "max_views": rng.randint(1, 8)}
    return FuzzCase(op, "reference", rng.choice([torch.float32, torch.float64]), "hostile", shape,
                    rng.choice(["contiguous", "transposed", "strided"]), options, seed)


def _single_implementation_hostile(c: FuzzCase, g: torch.Generator) -> None:
    n, d, classes, _ = c.shape
    labels = torch.randint(-1, classes, (n,), generator=g)
    pick = torch.rand(n, generator=g) < 0.3
    far = torch.randint(-(2**40), 2**40, (n,), generator=g)
    if c.op == "sample_anchors":  # labels have no upper bound there: negative ones are hostile
        hostile = torch.where(pick, -far.abs() - 2, labels)
        clean = torch.where(pick, -1, labels)
        predictions = torch.randint(0, classes, (n,), generator=g)

        def run(lab):
            b = 2 if n % 2 == 0 else 1
            return tuple(pk.sample_anchors(lab.view(b, -1), predictions.view(b, -1), max_samples=64,
                                           generator=torch.Generator().manual_seed(c.seed),
                                           validate=lab is clean, **c.options))
    else:
        hostile = torch.where(pick, far, labels)
        clean = torch.where((hostile >= 0) & (hostile < classes), hostile, -1)
        hierarchy = conformance.hierarchy_for(classes)
        embedding = _with_layout(torch.randn(n, d, generator=g, dtype=c.dtype), c.layout)
        embedding = torch.nn.functional.normalize(embedding, dim=1)

        def run(lab):
            return (pk.tree_triplet_loss(embedding, lab, hierarchy, max_triplet=8, validate=lab is clean,
                                         generator=torch.Generator().manual_seed(c.seed), **c.options),)
    _assert_same(run(hostile), run(clean), c)


def _with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (a view that is not contiguous)."""
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _contrast_case(c: FuzzCase):
    a, d, classes, m = c.shape
    return make_contrast_case(a, m, d, classes, c.options["mode"], seed=c.seed)


def _contrast_kwargs(c: FuzzCase) -> dict:
    return dict(temperature=c.options["temperature"], denominator=c.options["denominator"],
                normalize=c.options["normalize"], reduction="none")


# ---- finite: the conformance rules --------------------------------------------------
def _run_finite(c: FuzzCase) -> None:
    if c.op == "pixel_contrast_loss":
        case = _contrast_case(c)
        if not c.options["normalize"]:  # raw dot products of unit vectors, as users pass them:
            # |ℓ| <= 1/τ (raw norms of 5 give |ℓ| ~ 250, beyond fp32's 1e-5 relative accuracy)
            case.anchors = torch.nn.functional.normalize(case.anchors, dim=1)
            if case.contrast is not None:
                case.contrast = torch.nn.functional.normalize(case.contrast, dim=1)
        case.anchors = _with_layout(case.anchors, c.layout)
        kw = {k: v for k, v in c.options.items() if k not in ("mode",)}
        conformance.check_pixel_contrast_loss(c.backend, case, c.dtype, **kw)
        return
    if c.op == "tree_min_loss":
        case = make_case(*c.shape, seed=c.seed)
        conformance.check_tree_min_loss(c.backend, case, c.dtype, focal_gamma=c.options["focal_gamma"],
                                        image=c.options["image"])
        return
    case = make_case(*c.shape, seed=c.seed)
    if not c.options["normalize"]:  # unit rows, as users pass them (see above)
        case.x = torch.nn.functional.normalize(case.x, dim=-1)
        case.prototypes = torch.nn.functional.normalize(case.prototypes, dim=-1)
    case.x = _with_layout(case.x, c.layout)
    check = getattr(conformance, f"check_{c.op}")
    check(c.backend, case, c.dtype, **c.options)


# ---- hostile: out-of-range indices with validate=False --------------------------------
def _hostile(index: torch.Tensor, upper: int, rng: torch.Generator) -> torch.Tensor:
    """Some entries replaced by values far outside [0, upper) and by negatives."""
    out = index.clone()
    pick = torch.rand(index.shape, generator=rng) < 0.3
    wild = torch.tensor([upper, upper + 1, 2**31 - 1, 2**40, -2, -(2**40)])
    out[pick] = wild[torch.randint(0, len(wild), (int(pick.sum()),), generator=rng)]
    return out


def _tree_logits(c: FuzzCase) -> torch.Tensor:
    """Node logits [N, V] (laid out as the case's layout) for the C leaves of the case."""
    hierarchy = conformance.hierarchy_for(c.shape[2])
    g = torch.Generator().manual_seed(c.seed)
    return _with_layout(2 * torch.randn(c.shape[0], hierarchy.num_nodes, generator=g, dtype=torch.float64), c.layout)


def _tree_min(c: FuzzCase, logits: torch.Tensor, labels: torch.Tensor, validate: bool) -> tuple:
    hierarchy = conformance.hierarchy_for(c.shape[2])
    return (pk.tree_min_loss(logits, labels, hierarchy, focal_gamma=c.options["focal_gamma"], reduction="none",
                             validate=validate),)


def _call(op: str, c: FuzzCase, case, labels, target, index, validate: bool):
    x, p = case.x.to(c.dtype), case.prototypes.to(c.dtype)
    o = dict(c.options)
    if op == "prototype_similarity":
        return (pk.prototype_similarity(x, p, **o),)
    if op == "class_scores":
        return tuple(pk.class_scores(x, p, return_index=True, **o))
    if op == "ppc_ppd_loss":
        return tuple(pk.ppc_ppd_loss(x, p, target, reduction="none", validate=validate, **o))
    if op == "sinkhorn_assign":
        return tuple(pk.sinkhorn_assign(x, p, labels, return_q=True, validate=validate, **o))
    return tuple(pk.update_prototypes(p, x, labels, index, validate=validate, **o))


def _run_hostile(c: FuzzCase) -> None:
    g = torch.Generator().manual_seed(c.seed)
    if c.op in SINGLE_IMPLEMENTATION:
        _single_implementation_hostile(c, g)
        return
    if c.op == "pixel_contrast_loss":
        case, kw = _contrast_case(c), _contrast_kwargs(c)
        hostile = case.anchor_labels.clone()
        pick = torch.rand(hostile.shape, generator=g) < 0.3
        hostile[pick] = torch.tensor(-(2**40))  # negative: ignored with validate=False
        anchors = case.anchors.to(c.dtype)
        contrast = None if case.contrast is None else case.contrast.to(c.dtype)
        with pk.use_backend(c.backend):
            out = pk.pixel_contrast_loss(anchors, hostile, contrast, case.contrast_labels, validate=False, **kw)
            clean = torch.where(pick, -1, case.anchor_labels)
            expected = pk.pixel_contrast_loss(anchors, clean, contrast, case.contrast_labels, **kw)
        _assert_same((out,), (expected,), c)
        return
    if c.op == "tree_min_loss":
        labels = make_case(*c.shape, seed=c.seed).labels
        hostile = _hostile(labels, c.shape[2], g)
        clean = torch.where((hostile >= 0) & (hostile < c.shape[2]), hostile, -1)
        logits = _tree_logits(c).to(c.dtype)
        with pk.use_backend(c.backend):
            _assert_same(_tree_min(c, logits, hostile, False), _tree_min(c, logits, clean, True), c)
        return
    case = make_case(*c.shape, seed=c.seed)
    n, _, classes, k = c.shape
    labels, target, index = case.labels, case.target, case.index
    h_labels, h_target, h_index = _hostile(labels, classes, g), _hostile(target, classes * k, g), _hostile(index, k, g)
    clean = (torch.where((h_labels >= 0) & (h_labels < classes), h_labels, -1),
             torch.where((h_target >= 0) & (h_target < classes * k), h_target, -1),
             torch.where((h_index >= 0) & (h_index < k), h_index, -1))
    with pk.use_backend(c.backend):
        out = _call(c.op, c, case, h_labels, h_target, h_index, validate=False)
        expected = _call(c.op, c, case, *clean, validate=True)
    _assert_same(out, expected, c)


def _assert_same(out, expected, c: FuzzCase) -> None:
    for i, (a, b) in enumerate(zip(out, expected)):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                      and torch.equal(a.nan_to_num(), b.nan_to_num())), \
            f"output {i} differs from the result with the hostile entries ignored"


# ---- nan, inf: non-finite values exactly where the reference has them ------------------
def _poison_value(c: FuzzCase, g: torch.Generator) -> float:
    if c.check == "nan":
        return NAN
    return float("inf") if torch.rand((), generator=g) < 0.5 else float("-inf")


def _run_nonfinite(c: FuzzCase) -> None:
    g = torch.Generator().manual_seed(c.seed)
    poison = _poison_value(c, g)
    if c.op == "pixel_contrast_loss":
        case, kw = _contrast_case(c), _contrast_kwargs(c)
        anchors = case.anchors.clone()
        a, d = anchors.shape
        if a:
            anchors[torch.randint(0, a, (1,), generator=g), torch.randint(0, d, (1,), generator=g)] = poison

        def run(name, dtype):
            contrast = None if case.contrast is None else case.contrast.to(dtype)
            with pk.use_backend(name):
                return (pk.pixel_contrast_loss(anchors.to(dtype), case.anchor_labels, contrast,
                                               case.contrast_labels, **kw),)
    elif c.op == "tree_min_loss":
        logits, labels = _tree_logits(c).clone(), make_case(*c.shape, seed=c.seed).labels
        if logits.shape[0]:
            rows = torch.randint(0, logits.shape[0], (2,), generator=g)
            logits[rows, torch.randint(0, logits.shape[1], (2,), generator=g)] = poison

        def run(name, dtype):
            with pk.use_backend(name):
                return _tree_min(c, logits.to(dtype), labels, True)
    else:
        case = make_case(*c.shape, seed=c.seed)
        n, d = c.shape[:2]
        if n:
            rows = torch.randint(0, n, (2,), generator=g)
            case.x[rows, torch.randint(0, d, (2,), generator=g)] = poison

        def run(name, dtype):
            inputs = SimpleNamespace(x=case.x.to(dtype), prototypes=case.prototypes.to(dtype))
            with pk.use_backend(name):
                return _call(c.op, c, inputs, case.labels, case.target, case.index, validate=True)

    out, ref = run(c.backend, c.dtype), run("reference", c.dtype if c.dtype == torch.float64 else torch.float64)
    for i, (a, b) in enumerate(zip(out, ref)):
        if not a.is_floating_point():
            continue  # indices: covered by the finite checks and tests/test_nan_propagation.py
        for kind, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            differ = int((where(a) != where(b.to(a.dtype))).sum())
            assert differ == 0, f"output {i}: {kind} at {differ} places where the reference differs"


RUNNERS = {"finite": _run_finite, "hostile": _run_hostile, "nan": _run_nonfinite, "inf": _run_nonfinite}


@dataclass
class FuzzReport:
    cases: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        total = sum(self.cases.values())
        by_op = ", ".join(f"{op} {n}" for op, n in sorted(self.cases.items()))
        return f"{total} cases in {self.seconds:.0f} s ({by_op})"


def fuzz(seconds: float, seed: int, backends: list[str] | None = None, max_cases: int | None = None) -> FuzzReport:
    """Run random cases for ``seconds`` (or ``max_cases``); raise AssertionError naming the
    first failing case (rerun it with its seed)."""
    backends = usable_backends() if backends is None else backends
    if not backends:
        raise RuntimeError("no fused backend runs on CPU tensors here")
    rng = random.Random(seed)
    report, start = FuzzReport(), time.perf_counter()
    number = 0
    while time.perf_counter() - start < seconds and (max_cases is None or sum(report.cases.values()) < max_cases):
        number += 1
        case = draw_case(rng, backends, seed=seed * 100_003 + number)
        if case is None:
            continue
        try:
            RUNNERS[case.check](case)
        except Exception as exc:
            raise AssertionError(f"fuzz case {number} failed: {case.describe()}: {type(exc).__name__}: {exc}") from exc
        report.cases[case.op] += 1
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="time budget (default 600)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000, help="random seed (default: the clock)")
    parser.add_argument("--backends", default=",".join(FUSED), help=f"comma-separated (default {','.join(FUSED)})")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)  # as tests/conftest.py: outputs start as NaN
    torch.utils.deterministic.fill_uninitialized_memory = True
    backends = usable_backends(tuple(b for b in args.backends.split(",") if b))
    print(f"fuzzing {', '.join(backends)} for {args.seconds:.0f} s, seed {args.seed}", flush=True)
    report = fuzz(args.seconds, args.seed, backends)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
