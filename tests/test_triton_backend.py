"""Triton-specific checks beyond the shared conformance tests of each op file:
no N·C·K allocation, bad indices never addressed, strided and broadcast inputs,
fp16 gradients that would underflow, the block configurations used on GPUs, and
the backend's device and dtype rules. Runs through the interpreter without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import require_backend
from helpers import assert_close, largest_allocation, make_case

import protoseg_kernels as pk

F64 = torch.float64


@pytest.fixture(autouse=True)
def _triton():
    require_backend("triton")


def _kernels():
    from protoseg_kernels import triton as kernels

    return kernels


# ---- memory: nothing N×C×K, forward or backward (docs/spec.md §3.2-3.4) --------------------

# C·K = 128 ≫ D: an N·C·K fp32 buffer is 4× the largest legitimate one (the [N, C]
# int64 index, the [C·K, D] fp32 prototype-gradient partial).
N, D, C, K = 64, 16, 16, 8
NCK_BYTES = N * C * K * 4


def _head_ops(backend: str, which: str):
    case = make_case(N, D, C, K, dtype=torch.float32, seed=5)
    x = case.x.clone().requires_grad_()
    p = case.prototypes.clone().requires_grad_()

    def run():
        with pk.use_backend(backend):
            if which == "class_scores_max":
                pk.class_scores(x, p, return_index=True).scores.sum().backward()
            elif which == "class_scores_lse":
                out = pk.class_scores(x, p, reduction="logsumexp", lse_temperature=0.1)
                (out.scores.sum() + out.lse.sum()).backward()
            elif which == "ppc_ppd_loss":
                ppc, ppd = pk.ppc_ppd_loss(x, p, case.target, temperature=0.1)
                (ppc + ppd).backward()
            else:
                pk.sinkhorn_assign(case.x, case.prototypes, case.labels, return_q=True)

    return run


@pytest.mark.parametrize("which", ["class_scores_max", "class_scores_lse", "ppc_ppd_loss", "sinkhorn_assign"])
def test_no_allocation_of_n_c_k_size(which):
    largest = largest_allocation(_head_ops("triton", which))
    assert largest <= NCK_BYTES // 4, f"{which}: a {largest}-byte allocation (N·C·K fp32 is {NCK_BYTES})"


def test_allocation_probe_sees_the_reference_similarity_tensor():
    # The probe must be able to fail: the reference materialises S [N, C·K].
    assert largest_allocation(_head_ops("reference", "class_scores_lse")) >= NCK_BYTES


# ---- indices out of range are never used to address memory (docs/spec.md §5) ---------------

def test_class_scores_backward_ignores_out_of_range_index():
    kernels = _kernels()
    case = make_case(40, 20, 3, 4, dtype=torch.float32, seed=6)
    x, p = case.x, case.prototypes
    _, index, lse = kernels.class_scores_forward(x, p, True, "max", 1.0, None)
    grad = torch.randn(40, 3)
    bad = index.clone()
    bad[::3, 0] = 4 + 10**9  # beyond K (and far beyond the prototype storage)
    bad[1::3, 1] = -7
    dx, dp = kernels.class_scores_backward(grad, None, x, p, bad, lse, True, "max", 1.0, None, True)
    # The same as a gradient of zero at those entries with a valid index.
    dropped = torch.where((bad == index), grad, 0.0)
    dx_ref, dp_ref = kernels.class_scores_backward(dropped, None, x, p, index, lse, True, "max", 1.0, None, True)
    assert_close(dx, dx_ref, 1e-6, "dx")
    assert_close(dp, dp_ref, 1e-6, "dP")


def test_sinkhorn_kernels_skip_out_of_range_segments():
    # The kernels themselves (not only the op's sanitising) treat a class id >= C as
    # unlabelled: no prototype, β or class-max address is formed from it.
    kernels = _kernels()
    case = make_case(37, 10, 3, 4, dtype=torch.float32, seed=9)
    labels = case.labels.clamp_min(0)
    bad = labels.clone()
    bad[::4] = 3 + 10**9
    dropped = torch.where(bad == labels, labels, -1)

    def run(segment):
        logits = kernels.sinkhorn_logits(case.x, case.prototypes, segment, True, 0.05)
        class_max, sum_exp = kernels.sinkhorn_class_logsumexp(logits, segment, 3)
        beta = -(class_max + sum_exp.log()).nan_to_num(0.0, 0.0, 0.0)
        marginals = kernels.sinkhorn_marginals(logits, segment, beta)
        index, q = kernels.sinkhorn_finalize(logits, segment, beta, True)
        return logits, class_max, sum_exp, marginals, index, q

    for name, out, ref in zip(("logits", "class_max", "sum_exp", "marginals", "index", "q"), run(bad), run(dropped)):
        assert torch.equal(out, ref), name
    assert bool((run(bad)[4][::4] == -1).all())


def test_validate_false_out_of_range_labels_and_targets():
    case = make_case(50, 12, 4, 3, dtype=torch.float32, seed=7)
    labels = case.labels.clone()
    labels[:5] = 1000
    target = case.target.clone()
    target[:5] = -50
    outs = {}
    for backend in ("reference", "triton"):
        with pk.use_backend(backend):
            sk = pk.sinkhorn_assign(case.x, case.prototypes, labels, return_q=True, validate=False)
            ppc, _ = pk.ppc_ppd_loss(case.x, case.prototypes, target, reduction="none", validate=False)
            up = pk.update_prototypes(case.prototypes, case.x, labels, case.index, validate=False)
        outs[backend] = (sk, ppc, up)
    (ref_sk, ref_ppc, ref_up), (sk, ppc, up) = outs["reference"], outs["triton"]
    assert bool((sk.index[:5] == -1).all()) and bool((ppc[:5] == 0).all())
    assert_close(sk.q, ref_sk.q, 1e-5, "q")
    assert_close(ppc, ref_ppc, 1e-5, "ppc")
    assert torch.equal(up.counts, ref_up.counts)


# ---- strided and broadcast inputs --------------------------------------------------

def test_strided_x_and_broadcast_upstream_gradients():
    case = make_case(45, 24, 5, 3, seed=8)
    x_t = case.x.float().T.contiguous().T  # column-major [N, D]
    assert not x_t.is_contiguous()
    p = case.prototypes.float()[:, :, :].transpose(0, 1).contiguous().transpose(0, 1)  # strided [C, K, D]
    results = {}
    for backend in ("reference", "triton"):
        x = x_t.clone().requires_grad_() if backend == "triton" else x_t.double().requires_grad_()
        pp = p.clone().requires_grad_() if backend == "triton" else p.double().requires_grad_()
        with pk.use_backend(backend):
            out = pk.class_scores(x, pp, lse_temperature=0.5)
            ppc, ppd = pk.ppc_ppd_loss(x, pp, case.target)  # mean: stride-0 upstream gradients
        (out.scores.sum() + out.lse.mean() + ppc + ppd).backward()  # sum: a stride-0 [N, C] gradient
        results[backend] = (out.scores, out.lse, ppc, x.grad, pp.grad)
    for name, a, b in zip(("scores", "lse", "ppc", "dx", "dP"), results["triton"], results["reference"]):
        assert_close(a, b, 1e-5, name)


# ---- fp16 gradients: per-tile scaling keeps small dS from flushing to zero ----------

def test_fp16_small_upstream_gradients_keep_their_precision():
    # ADE20K-like C·K = 1500: a mean loss spreads g/1500 over each pixel's dS entries,
    # deep in fp16's subnormal range, while dx itself is a normal fp16 number. Without
    # the per-tile scaling of dS the error here is about 3× larger (1.6e-3).
    case = make_case(24, 16, 150, 10, seed=9)
    grads = {}
    for backend, dtype in (("reference", F64), ("triton", torch.float16)):
        x = case.x.to(torch.float16).to(dtype).requires_grad_()
        with pk.use_backend(backend):
            ppc, _ = pk.ppc_ppd_loss(x, case.prototypes.to(torch.float16).to(dtype), case.target)
        (ppc * 1e-2).backward()
        grads[backend] = x.grad
    assert_close(grads["triton"], grads["reference"], 1e-3, "dx")


# ---- block configurations of the GPU path (not run here, so checked for legality) --

@pytest.mark.parametrize("c", [1, 3, 19, 150, 171, 409])
@pytest.mark.parametrize("k", [1, 3, 5, 10, 16, 33])
def test_gpu_tile_configurations_are_legal(c, k):
    from protoseg_kernels.triton import _config

    meta = torch.device("meta")

    def pow2(v):
        return v > 0 and v & (v - 1) == 0

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        layouts = [_config.class_scores_forward_tiles(meta, dtype, c, k), _config.flat_forward_tiles(meta, dtype, c, k),
                   *(_config.gradient_tiles(meta, dtype, c, k, layout) for layout in _config.LAYOUTS)]
        for tiles in layouts:
            assert all(pow2(v) for v in (tiles.block_n, tiles.block_d, tiles.k_slots, tiles.block_c))
            assert min(tiles.block_n, tiles.block_d, tiles.width) >= 16  # tl.dot's minimum
            assert tiles.width <= 256
        assert layouts[-1].k_slots >= k  # whole classes per tile for the per-class softmax
    seg = _config.segment_tiles(meta, c, k)
    assert seg.k_pad >= k and seg.block_n * seg.block_c * seg.k_pad <= 8192


def test_gradient_splits_bound_the_partial_buffers():
    from protoseg_kernels.triton import _config

    meta = torch.device("meta")
    for n, ck, d in [(32768, 1500, 720), (65536, 190, 720), (64, 128, 16), (1, 4096, 8)]:
        blocks = -(-n // 64)
        splits = _config.gradient_splits(meta, n, ck, d, blocks, column_tiles=12)
        assert 1 <= splits <= blocks
        assert splits * ck * d <= max(n * d, ck * d)  # never more than an fp32 copy of x


# ---- device and dtype rules ---------------------------------------------------------

def test_serves_cpu_tensors_only_under_the_interpreter():
    kernels = _kernels()
    from protoseg_kernels.triton import _host

    reason = kernels.device_reason(torch.device("cpu"))
    if _host.INTERPRETING:
        assert reason is None
    else:
        assert "TRITON_INTERPRET=1" in reason
    assert "CUDA" in kernels.device_reason(torch.device("meta"))


def test_float64_is_refused_with_the_argument_named():
    x, p = torch.randn(5, 4, dtype=F64), torch.randn(2, 3, 4, dtype=F64)
    expected = r"class_scores: x is float64, but the triton backend computes class_scores in fp16, bf16, fp32"
    with pk.use_backend("triton"), pytest.raises(TypeError, match=expected):
        pk.class_scores(x, p)


def test_float64_prototypes_updated_in_float64():
    case = make_case(30, 8, 3, 2, seed=10)
    outs = {}
    for backend in ("reference", "triton"):
        with pk.use_backend(backend):
            outs[backend] = pk.update_prototypes(case.prototypes, case.x.float(), case.labels, case.index, momentum=0.7)
    assert outs["triton"].prototypes.dtype == F64
    assert_close(outs["triton"].prototypes, outs["reference"].prototypes, 1e-6, "prototypes")


# ---- the libdevice-free logarithm -------------------------------------------------

def test_natural_log_matches_torch_to_a_few_ulp():
    from triton_log_kernel import natural_log_of

    # log-sum-exp sums lie in [1, C·K]; cover that and far beyond, and every mantissa region.
    x = torch.cat([torch.linspace(1.0, 4.0, 3001), torch.logspace(-30, 30, 2001), torch.rand(2000) * 5000 + 1e-3])
    expected = torch.log(x.double())
    error = (natural_log_of(x).double() - expected).abs() / expected.abs().clamp_min(1.0)
    assert float(error.max()) < 4 * 2.0**-24
