"""The cpu backend beyond the shared conformance tests: float64 gradcheck through the
C++ kernels, bitwise determinism across thread counts, hostile indices, no N·C·K
allocation, and numerics at the edges (large logits, tiny temperatures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conformance import check_class_scores, check_ppc_ppd_loss, check_prototype_similarity
from conftest import require_backend
from helpers import assert_bitwise_equal, make_case, relative_error

import protoseg_kernels as pk

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "cpu_backend_worker.py"


@pytest.fixture(autouse=True)
def cpu_backend():
    require_backend("cpu")
    with pk.use_backend("cpu"):
        yield


def _run_worker(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=TESTS.parent)


# ---- gradcheck in float64 --------------------------------------------------------

def _leaves(shape, seed):
    case = make_case(*shape, seed=seed)
    return case, case.x[:23].clone().requires_grad_(), case.prototypes.clone().requires_grad_()


@pytest.mark.parametrize("reduction", ["max", "logsumexp"])
@pytest.mark.parametrize("lse_temperature", [None, 0.4])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_class_scores(reduction, lse_temperature, normalize):
    _, x, p = _leaves((40, 7, 4, 3), seed=1)

    def fn(x, p):
        out = pk.class_scores(x, p, normalize=normalize, reduction=reduction, temperature=0.5,
                              lse_temperature=lse_temperature)
        return out if lse_temperature is None else (out.scores, out.lse)

    assert torch.autograd.gradcheck(fn, (x, p))


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_ppc_ppd_loss(normalize):
    case, x, p = _leaves((40, 6, 3, 4), seed=2)
    target = case.target[:23]
    assert torch.autograd.gradcheck(
        lambda x, p: tuple(pk.ppc_ppd_loss(x, p, target, normalize=normalize, temperature=0.3,
                                           reduction="none")), (x, p))


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_prototype_similarity(normalize):
    _, x, p = _leaves((40, 5, 3, 2), seed=3)
    assert torch.autograd.gradcheck(lambda x, p: pk.prototype_similarity(x, p, normalize=normalize), (x, p))


def test_gradcheck_across_several_tiles_and_chunks():
    # 300 rows: three tiles of 128 rows, each its own dP chunk, and a ragged last tile.
    case = make_case(300, 6, 3, 2, seed=4)
    x, p = case.x.clone().requires_grad_(), case.prototypes.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, p: tuple(pk.class_scores(x, p, return_index=False, lse_temperature=0.3)), (x, p))


# ---- determinism across thread counts --------------------------------------------

def test_bitwise_identical_with_one_and_two_threads(tmp_path):
    results = []
    for threads in ("1", "2"):
        path = tmp_path / f"threads{threads}.pt"
        proc = _run_worker("determinism", threads, str(path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(torch.load(path))
    one, two = results
    assert one.keys() == two.keys() and len(one) > 20
    for name in one:
        assert_bitwise_equal(one[name], two[name], name)


# ---- hostile indices ---------------------------------------------------------------

def test_out_of_range_indices_never_crash_the_process():
    proc = _run_worker("bad_indices")
    assert proc.returncode == 0, f"worker exited with {proc.returncode}: {proc.stderr[-3000:]}"
    assert "survived" in proc.stdout


def test_validate_false_treats_out_of_range_as_ignored():
    case = make_case(200, 9, 4, 3, dtype=torch.float32, seed=6)
    bad = case.target.clone()
    bad[::7] = 10**6
    ignored = torch.where(bad == 10**6, -1, bad)
    a = pk.ppc_ppd_loss(case.x, case.prototypes, bad, validate=False, reduction="none")
    b = pk.ppc_ppd_loss(case.x, case.prototypes, ignored, reduction="none")
    assert_bitwise_equal(a.ppc, b.ppc)
    assert_bitwise_equal(a.ppd, b.ppd)


# ---- no N·C·K allocation -----------------------------------------------------------

# N·C·K·4 bytes = 128 MiB, while x is 1 MiB and the largest legitimate buffers are
# [N, C] (scores 2 MiB, int64 index 4 MiB) and q [N, K] (4 MiB).
NO_NCK_SHAPE = (16384, 16, 32, 64)


def _peak_growth(backend: str) -> int:
    proc = _run_worker("peak_memory", backend, *map(str, NO_NCK_SHAPE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_no_allocation_of_size_n_c_k(backend):
    n, _, c, k = NO_NCK_SHAPE
    full = n * c * k * 4
    growth = _peak_growth(backend)
    if backend == "reference":
        assert growth >= full  # the measurement sees an N·C·K buffer where there is one
    else:
        assert growth < full / 4, f"peak memory grew by {growth} bytes; N·C·K·4 is {full} bytes"


# ---- numerics at the edges ---------------------------------------------------------

def _class_scores_and_grads(backend, x, p, **kwargs):
    x = x.clone().requires_grad_()
    with pk.use_backend(backend):
        out = pk.class_scores(x, p, return_index=True, **kwargs)
    weights = torch.linspace(-1, 1, out.scores.numel(), dtype=torch.float64).view_as(out.scores)
    ((out.scores.double() * weights).sum() + out.lse.double().sum()).backward()
    return {"scores": out.scores, "lse": out.lse, "dx": x.grad}


def test_large_unnormalized_logits():
    # S up to ~±300 at temperatures 0.02 and 0.05: the exponents span thousands, far
    # beyond the float range, so every log-sum-exp must be shifted by its maximum. The
    # problem is ill-conditioned in float32 (the exponents carry an absolute error of
    # |S|·1e-7/τ), so the bar is plain PyTorch's own float32 error (docs/spec.md §5 rule).
    case = make_case(333, 21, 9, 5, seed=8)
    x, p = case.x * 4.0, case.prototypes
    kwargs = dict(normalize=False, reduction="logsumexp", temperature=0.02, lse_temperature=0.05)
    exact = _class_scores_and_grads("reference", x, p, **kwargs)
    plain = _class_scores_and_grads("reference", x.float(), p.float(), **kwargs)
    fused = _class_scores_and_grads("cpu", x.float(), p.float(), **kwargs)
    for name, ref in exact.items():
        bound = 2 * relative_error(plain[name], ref) + 1e-6
        assert relative_error(fused[name], ref) <= bound, name
    assert torch.isfinite(fused["lse"]).all() and float(fused["lse"].detach().abs().max()) > 1000

    def ppc_and_grads(backend, x, p):
        x = x.clone().requires_grad_()
        with pk.use_backend(backend):
            ppc, ppd = pk.ppc_ppd_loss(x, p, case.target, normalize=False, temperature=0.05, reduction="none")
        (ppc.double().sum() + ppd.double().sum()).backward()
        return {"ppc": ppc, "ppd": ppd, "dx": x.grad}

    exact = ppc_and_grads("reference", x, p)
    plain = ppc_and_grads("reference", x.float(), p.float())
    fused = ppc_and_grads("cpu", x.float(), p.float())
    for name, ref in exact.items():
        assert relative_error(fused[name], ref) <= 2 * relative_error(plain[name], ref) + 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_prototype_similarity_over_several_column_blocks(dtype):
    # C·K = 2270: forward blocks of 128 columns and backward blocks of 2048 (dx̂ summed over
    # blocks, dP written per block), the last block of each ragged.
    check_prototype_similarity("cpu", make_case(150, 12, 227, 10, seed=11), dtype)
    check_prototype_similarity("cpu", make_case(130, 7, 227, 10, seed=12), dtype, normalize=False)


def test_zero_rows_follow_the_norm_clamp():
    case = make_case(130, 8, 3, 4, seed=9)
    case.x[::5] = 0.0
    case.prototypes[1, 2] = 0.0
    check_class_scores("cpu", case, torch.float32, lse_temperature=0.5)
    check_ppc_ppd_loss("cpu", case, torch.float32)


def test_float64_matches_reference_to_float64_precision():
    case = make_case(257, 19, 6, 4, seed=10)
    out = pk.class_scores(case.x, case.prototypes, lse_temperature=0.2, reduction="logsumexp")
    with pk.use_backend("reference"):
        ref = pk.class_scores(case.x, case.prototypes, lse_temperature=0.2, reduction="logsumexp")
    assert torch.allclose(out.scores, ref.scores, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out.lse, ref.lse, rtol=1e-12, atol=1e-12)


def test_env_report_shows_build_metadata():
    proc = subprocess.run([sys.executable, "-m", "protoseg_kernels.env"], capture_output=True, text=True,
                          cwd=TESTS.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for word in ("extension_build", "torch", "cxx11_abi", "compiler", "cxx_flags", "-O3"):
        assert word in proc.stdout
