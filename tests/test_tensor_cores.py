"""The tensor-core paths of the CUDA kernels (csrc/cuda/tile_math.cuh), run through the
host emulation of ``nvcuda::wmma`` (csrc/emulation/wmma_emulation.h).

fp16 and bf16 always run on tensor cores, so every op test of ``cuda_emulated`` at those
dtypes checks them. fp32 runs on tensor cores in tf32 only when torch allows TF32
matmuls; here each GEMM-work op runs in fp32 both ways: the tf32 results must match the
float64 reference to tf32 accuracy and must differ from the FMA results (so the
tensor-core path did run), while the FMA results keep the fp32 tolerance.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import require_backend
from helpers import F64, make_case, relative_error

import protoseg_kernels as pk

TF32_TOL = 3e-3  # tf32 keeps 10 mantissa bits (unit roundoff 2^-11 ≈ 4.9e-4); errors add over D
FP32_TOL = 1e-5
# Where the CUDA kernels run: the host emulation on CPU tensors, or the real build on a GPU.
PLACES = {"emulated": ("cuda_emulated", "cpu"), "gpu": ("cuda", "cuda")}


def _place(name: str) -> tuple[str, str]:
    backend, device = PLACES[name]
    if device == "cpu":
        require_backend(backend)
        return backend, device
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from protoseg_kernels._backend import unavailable_reason

    reason = unavailable_reason(backend)
    if reason is not None:  # a GPU machine without the CUDA build is a failed check, not a skip
        pytest.fail(f"the {backend} backend cannot run on this GPU machine: {reason}")
    return backend, device


def _allow_tf32(allow: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = allow


@pytest.fixture(autouse=True)
def _restore_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    _allow_tf32(before)


def _outputs(fn: Callable[..., list[torch.Tensor]], inputs: list[torch.Tensor], backend: str) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with pk.use_backend(backend):
        outs = fn(*leaves)
        loss = sum((o.to(F64) * (1 + torch.arange(o.numel(), dtype=F64).view(o.shape) % 3)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])
    return [o.detach() for o in outs] + list(grads)


def _case_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    case = make_case(70, 40, 5, 3, seed=seed)
    return case.x, case.prototypes, case.target


OPS = {
    "prototype_similarity": (lambda x, p, t: [pk.prototype_similarity(x, p)], True),
    "class_scores": (lambda x, p, t: list(pk.class_scores(x, p, reduction="logsumexp", temperature=0.5,
                                                          lse_temperature=0.1)), True),
    "ppc_ppd_loss": (lambda x, p, t: list(pk.ppc_ppd_loss(x, p, t, temperature=0.1, reduction="sum")), True),
    "pixel_contrast_loss": (lambda x, p, t: [pk.pixel_contrast_loss(x, t, temperature=0.1, reduction="sum")], False),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("place", sorted(PLACES))
def test_fp32_runs_on_tensor_cores_in_tf32_when_torch_allows_it(place, op):
    backend, device = _place(place)
    fn, with_prototypes = OPS[op]
    x, p, t = (v.to(device) for v in _case_inputs(seed=5))
    inputs = [x, p, t] if with_prototypes else [x, t]

    def call(*leaves):
        return fn(*leaves) if with_prototypes else fn(leaves[0], None, leaves[1])

    reference = _outputs(call, inputs, "reference")
    fp32 = [i.float() if i.is_floating_point() else i for i in inputs]
    _allow_tf32(False)
    fma = _outputs(call, fp32, backend)
    _allow_tf32(True)
    tf32 = _outputs(call, fp32, backend)
    assert len(fma) == len(tf32) == len(reference)
    for i, (a, b, ref) in enumerate(zip(fma, tf32, reference)):
        assert relative_error(a, ref) <= FP32_TOL, f"{op} output {i}: FMA path off the reference"
        assert relative_error(b, ref) <= TF32_TOL, f"{op} output {i}: tf32 path off the reference"
    differing = [relative_error(b, a) > 1e-6 for a, b in zip(fma, tf32)]
    assert any(differing), f"{op}: tf32 results equal the FMA results: the tensor cores did not run"
    assert differing[-1], f"{op}: the backward did not run on tensor cores in tf32"


@pytest.mark.parametrize("place", sorted(PLACES))
def test_tf32_flag_leaves_fp16_and_fp64_paths_unchanged(place):
    """fp16 is on tensor cores and fp64 on FMA units whatever the TF32 flag says."""
    backend, device = _place(place)
    x, p, _ = (v.to(device) for v in _case_inputs(seed=6))
    for dtype in (torch.float16, torch.float64):
        results = []
        for allow in (False, True):
            _allow_tf32(allow)
            with pk.use_backend(backend):
                results.append(pk.prototype_similarity(x.to(dtype), p.to(dtype)))
        assert torch.equal(results[0], results[1]), dtype
