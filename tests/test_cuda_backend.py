"""The CUDA backend (csrc/cuda): the real extension registers a CUDA kernel for every
schema; the host emulation header (csrc/emulation) runs CUDA constructs correctly on
its own; the emulated build never allocates N·C·K; with a GPU, the kernels match the
reference (and triton), the pixel contrast's included, and are timed. The op test files
compare ``cuda_emulated`` with the reference for every op (docs/spec.md §5)."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conformance import (
    check_class_scores,
    check_pixel_contrast_loss,
    check_ppc_ppd_loss,
    check_prototype_similarity,
    check_sinkhorn_assign,
    check_tree_min_loss,
    check_update_prototypes,
)
from conftest import _required_backends, require_backend
from contrast_cases import DENOMINATORS, MODES, ContrastCase, make_contrast_case
from helpers import RAGGED_SHAPES, Case, assert_bitwise_equal, assert_close, largest_allocation, make_case

import protoseg_kernels as pk
from protoseg_kernels._backend import unavailable_reason
from protoseg_kernels._compiled import build_info, has_kernel
from protoseg_kernels._op_table import OPS

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- the real extension ------------------------------------------------------------

def require_cuda_build() -> None:
    """Skip (or fail, when PROTOSEG_REQUIRE_BACKENDS names cuda) unless the extension was
    built with the CUDA kernels; unlike require_backend, no GPU is needed."""
    reason = unavailable_reason("cuda")
    if reason is None:
        return
    if "cuda" in _required_backends():
        pytest.fail(f"backend 'cuda' is required by PROTOSEG_REQUIRE_BACKENDS but unavailable: {reason}")
    pytest.skip(f"backend 'cuda' unavailable: {reason}")


def _cuda_source_kernels() -> list[str]:
    """The kernels of every op that has a CUDA source csrc/cuda/<op>.cu."""
    return [k.name for op in OPS if (ROOT / "csrc" / "cuda" / f"{op.name}.cu").exists() for k in op.kernels]


def test_real_extension_registers_a_cuda_kernel_for_every_cuda_source():
    # tests/test_op_inventory.py checks, op by op, that the declarations match the sources;
    # this checks the real (nvcc) build registered them for the CUDA dispatch key.
    require_cuda_build()
    missing = [k for k in _cuda_source_kernels() if not has_kernel("protoseg_kernels", k, "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


def test_real_extension_was_compiled_for_sm80_and_sm90():
    require_cuda_build()
    info = build_info()
    archs = {arch.strip().removesuffix("+PTX") for arch in info["cuda_archs"].replace(",", ";").split(";")}
    assert info["cuda_kernels"] and {"8.0", "9.0"} <= archs, f"built for {info['cuda_archs']!r}"


def test_emulated_extension_registers_every_cuda_source_kernel_for_cpu():
    require_backend("cuda_emulated")
    missing = [k for k in _cuda_source_kernels() if not has_kernel("protoseg_kernels_emulated", k, "CPU")]
    assert not missing, f"no emulated kernel registered for {missing}"


# ---- the emulation header on its own -------------------------------------------------

@pytest.fixture(scope="module")
def probe_output(tmp_path_factory) -> dict[str, str]:
    """Compile tests/emulation_probe.cpp against the emulation header and run it."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the emulation probe")
    binary = tmp_path_factory.mktemp("probe") / "emulation_probe"
    subprocess.run(
        [compiler, "-std=c++20", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-pthread",
         "-DPROTOSEG_EMULATION", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "emulation_probe.cpp"),
         "-o", str(binary)],
        check=True, capture_output=True, text=True,
    )
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True, timeout=120).stdout
    return dict(line.split(" ", 1) for line in out.strip().splitlines())


def _ints(text: str) -> torch.Tensor:
    return torch.tensor([int(v) for v in text.split()])


def test_emulation_runs_shared_memory_barriers_shuffles_ballots_and_atomics(probe_output):
    n, threads = 1000, 128
    values = torch.tensor([(i * 37) % 201 - 100 for i in range(n)])
    padded = torch.cat([values, values.new_zeros(-n % threads)])
    assert torch.equal(_ints(probe_output["block_sums"]), padded.view(-1, threads).sum(1))
    warps = padded.view(-1, 32)
    assert torch.equal(_ints(probe_output["warp_scan"]), warps.cumsum(1).flatten()[:n])
    assert torch.equal(_ints(probe_output["lane0"]), warps[:, :1].expand(-1, 32).flatten()[:n])
    total, positives, maximum = _ints(probe_output["totals"]).tolist()
    assert (total, positives, maximum) == (int(values.sum()), int((values > 0).sum()), int(values.max()))


def test_emulation_reports_a_divergent_barrier_and_a_bad_launch(probe_output):
    assert "divergent __syncthreads" in probe_output["divergent_barrier"]
    assert "invalid block dimensions" in probe_output["oversized_block"]


def test_emulated_half_types_round_like_torch(probe_output):
    samples = torch.tensor([1.0, 0.1, -3.14159265, 65504.0, 70000.0, 1e-7, 6.0e-8, 1.00048828125, 1.0009765625,
                            -0.0, 3.0e38, 1.00390625, 1.01171875])
    for name, dtype in (("half_bits", torch.float16), ("bfloat16_bits", torch.bfloat16)):
        expected = samples.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        assert torch.equal(_ints(probe_output[name]), expected), name


def _tf32(values: torch.Tensor, rounded: bool) -> torch.Tensor:
    """fp32 values as a tensor core reads them: rounded to nearest, ties away (cvt.rna),
    or truncated (a value not converted)."""
    bits = values.to(torch.float32).view(torch.int32)
    bits = (bits + 0x1000 if rounded else bits) & ~0x1FFF
    return bits.view(torch.float32)


def test_emulated_wmma_products_match_the_rounded_operands(probe_output):
    side = 32
    i, k = torch.arange(side).view(-1, 1), torch.arange(side).view(1, -1)
    a = (((7 * i + 3 * k) % 23) - 11).to(torch.float32) / 8
    b = (((5 * i + 11 * k) % 19) - 9).to(torch.float32) / 16 + 2.0**-12  # b[j][k]: column j of the product
    operands = {"wmma_fp16": (a.half(), b.half()), "wmma_bf16": (a.bfloat16(), b.bfloat16()),
                "wmma_tf32": (_tf32(a, True), _tf32(b, True)),
                "wmma_tf32_unrounded": (_tf32(a, True), _tf32(b, False))}  # mma_sync truncates b
    for name, (fa, fb) in operands.items():
        expected = fa.double() @ fb.double().T
        got = torch.tensor([float(v) for v in probe_output[name].split()], dtype=torch.float64).view(side, side)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=name)
    # the two tf32 products differ: truncation is not rounding
    assert not torch.allclose(_floats(probe_output["wmma_tf32"]), _floats(probe_output["wmma_tf32_unrounded"]))
    assert probe_output["tf32_rounding"].split() == ["1", "1.00097656", "-1.00097656"]


def _floats(text: str) -> torch.Tensor:
    return torch.tensor([float(v) for v in text.split()])


def test_emulated_wmma_refuses_misaligned_and_divergent_fragments(probe_output):
    assert "256-bit aligned" in probe_output["wmma_misaligned"]
    assert "not all of them called it" in probe_output["wmma_divergent"]


# ---- memory: never N·C·K -------------------------------------------------------------

def test_emulated_kernels_never_allocate_n_c_k():
    require_backend("cuda_emulated")
    # K large enough that the legitimate [N, C] int64 buffers stay well below N·C·K fp32.
    case = make_case(700, 8, 12, 16, dtype=torch.float32, seed=5)
    n, _, c, k = case.shape
    ck_bytes = n * c * k * 4

    def head_step():
        x = case.x.clone().requires_grad_()
        p = case.prototypes.clone().requires_grad_()
        out = pk.class_scores(x, p, reduction="logsumexp", return_index=True, lse_temperature=0.1)
        ppc, ppd = pk.ppc_ppd_loss(x, p, case.target)
        (out.scores.sum() + out.lse.sum() + ppc + ppd).backward()
        index = pk.sinkhorn_assign(case.x, case.prototypes, case.labels).index
        pk.update_prototypes(case.prototypes, case.x, case.labels, index)

    with pk.use_backend("cuda_emulated"):
        largest = largest_allocation(head_step)
    with pk.use_backend("reference"):
        reference_largest = largest_allocation(head_step)
    assert reference_largest >= ck_bytes, "the probe does not see the reference's N·C·K tensors"
    assert largest < ck_bytes // 4, f"largest allocation {largest} B vs N·C·K = {ck_bytes} B"


# ---- the kernel report's parsing (make kernel-report compiles) ------------------------

PTXAS_LOG = """\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelIfEvPT_
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 41600 bytes smem, 472 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z4scanPKl' for 'sm_90'
ptxas info    : Function properties for _Z4scanPKl
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 36 registers, used 0 barriers, 384 bytes cmem[0]
"""


def test_kernel_report_parses_ptxas_and_names_kernels():
    from benchmarks import kernel_report_cuda as report

    rows = report.parse_ptxas(PTXAS_LOG)
    assert [(r["mangled"], r["registers"], r["spills"], r["stack"], r["shared"]) for r in rows] == [
        ("_Z6kernelIfEvPT_", 96, 16, 8, 41600), ("_Z4scanPKl", 36, 0, 0, 0)]
    demangled = ("void protoseg::cuda::grad_p_kernel<__nv_bfloat16, float, protoseg::cuda::(anonymous namespace)"
                 "::PpcPpdGradient<float>>(protoseg::cuda::SimilarityOperands<__nv_bfloat16, float>, long)")
    assert report.describe(demangled) == ("grad_p_kernel<PpcPpdGradient>", "bf16")
    assert report.describe("protoseg::cuda::(anonymous namespace)::scan_kernel(long const*)") == ("scan_kernel", "-")
    tensor_core = ("void protoseg::cuda::grad_c_kernel<float, float, protoseg::cuda::(anonymous namespace)::"
                   "ContrastGradient<float>, (protoseg::cuda::TileMath)1>(protoseg::cuda::SimilarityOperands<float, "
                   "float>, long)")
    assert report.describe(tensor_core) == ("grad_c_kernel<ContrastGradient>", "fp32/tc")
    assert report.describe(tensor_core.replace("TileMath)1", "TileMath)0"))[1] == "fp32/fma"


SASS = """
        Function : _Z4gemmv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*03b0*/                   HMMA.16816.F32.BF16 R4, R8.reuse, R4, RZ ;
        /*03c0*/              @!P0 HMMA.1684.F32.TF32 R12, R16.reuse, R14, RZ ;
        /*03d0*/                   HFMA2.MMA R2, -RZ, RZ, 0, 0 ;
        /*03e0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        Function : _Z4scanv
        /*0000*/                   HFMA2.MMA R2, -RZ, RZ, 0, 0 ;
"""


def test_kernel_report_counts_tensor_core_instructions_and_flags_gemm_kernels_without_them():
    from benchmarks import kernel_report_cuda as report
    from benchmarks import sass

    # HMMA (predicated or not) and HGMMA count; HFMA2.MMA is a plain FMA on the MMA pipe.
    assert sass.count_tensor_core_instructions(SASS) == {"_Z4gemmv": 3, "_Z4scanv": 0}
    rows = [{"kernel": "grad_x_kernel<Rule>", "config": f"{e}/tc", "target": t, "tensor_cores": 8}
            for e in ("fp16", "bf16", "fp32") for t in ("sm_80", "sm_90")]
    rows.append({"kernel": "grad_x_kernel<Rule>", "config": "fp64/fma", "target": "sm_80", "tensor_cores": 0})
    assert report.gemm_problems(rows) == []
    rows[0]["tensor_cores"] = 0  # a tensor-core instantiation without tensor-core code
    del rows[3]                  # bf16 on sm_90 missing
    problems = report.gemm_problems(rows)
    assert [(p["config"], p["target"], p["problem"]) for p in problems] == [
        ("fp16/tc", "sm_80", "a tensor-core instantiation without tensor-core instructions"),
        ("bf16/tc", "sm_90", "no tensor-core instantiation")]


def test_real_extension_binary_holds_sm80_and_sm90_code():
    """The architectures in the built binary itself, not only in the build record (torch adds
    no -gencode flags once an nvcc flag mentions an arch: setup.py writes them)."""
    require_cuda_build()
    from benchmarks import sass

    tool = sass.find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to list the binary's code")
    import protoseg_kernels._C as extension

    listing = subprocess.run([tool, "--list-elf", extension.__file__], capture_output=True, text=True,
                             check=True).stdout
    found = set(re.findall(r"\.(sm_\d+)\.cubin", listing))
    assert {"sm_80", "sm_90"} <= found, listing


# ---- on a GPU ------------------------------------------------------------------------

def _to_gpu(case: Case) -> Case:
    return Case(*(t.cuda() for t in (case.x, case.prototypes, case.labels, case.target, case.index)))


def _check_every_op(case: Case, dtype: torch.dtype, prototype_grad: bool) -> None:
    check_prototype_similarity("cuda", case, dtype)
    for reduction, lse_temperature in (("max", None), ("max", 0.1), ("logsumexp", 0.1)):
        check_class_scores("cuda", case, dtype, reduction=reduction, lse_temperature=lse_temperature,
                           prototype_grad=prototype_grad)
    check_ppc_ppd_loss("cuda", case, dtype, prototype_grad=prototype_grad)
    check_sinkhorn_assign("cuda", case, dtype)
    check_update_prototypes("cuda", case, dtype)
    check_tree_min_loss("cuda", case, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
def test_gpu_cuda_matches_reference(shape, dtype):
    require_cuda_build()
    _check_every_op(_to_gpu(make_case(*shape, seed=40)), dtype, prototype_grad=shape[3] != 1)


# docs/spec.md §7 presets with N scaled by 1/4 (the reference materialises N·C·K in float64).
PRESETS = {"cityscapes": (16_384, 720, 19, 10), "ade20k": (8_192, 720, 150, 10)}


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_gpu_cuda_matches_reference_at_presets(preset, dtype):
    require_cuda_build()
    _check_every_op(_to_gpu(make_case(*PRESETS[preset], seed=41)), dtype, prototype_grad=True)


@needs_gpu
def test_gpu_cuda_is_deterministic():
    require_cuda_build()
    case = _to_gpu(make_case(*PRESETS["ade20k"], dtype=torch.float32, seed=42))

    def run():
        x = case.x.clone().requires_grad_()
        p = case.prototypes.clone().requires_grad_()
        with pk.use_backend("cuda"):
            out = pk.class_scores(x, p, return_index=True, lse_temperature=0.1)
            ppc, ppd = pk.ppc_ppd_loss(x, p, case.target)
            (out.scores.sum() + out.lse.sum() + ppc + ppd).backward()
            sk = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, return_q=True)
            up = pk.update_prototypes(case.prototypes, case.x, case.labels, sk.index)
        return out.scores, out.index, out.lse, x.grad, p.grad, sk.q, up.prototypes

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)


def _contrast_to_gpu(case: ContrastCase) -> ContrastCase:
    return ContrastCase(*(None if t is None else t.cuda() for t in case.args()))


# (A, M, D, classes): the ragged shapes of tests/test_pixel_contrast_loss.py, then the in-batch
# and bank presets of docs/spec.md §7 (the bank's M = 190,000 scaled by 1/4: the reference
# materialises A×M in float64).
CONTRAST_SHAPES = [(1031, 4099, 77, 19), (257, 129, 33, 7), (1, 300, 9, 3), (1024, 47_500, 256, 19)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_gpu_cuda_pixel_contrast_matches_reference(denominator, mode, dtype):
    require_cuda_build()
    for i, (a, m, d, classes) in enumerate(CONTRAST_SHAPES):
        case = _contrast_to_gpu(make_contrast_case(a, m, d, classes, mode, seed=60 + i))
        check_pixel_contrast_loss("cuda", case, dtype, denominator=denominator, contrast_grad=i % 2 == 0)


@needs_gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_cuda_pixel_contrast_is_deterministic(mode):
    require_cuda_build()
    case = _contrast_to_gpu(make_contrast_case(1024, 47_500, 256, 19, mode, seed=64, dtype=torch.float32))

    def run():
        anchors = case.anchors.clone().requires_grad_()
        contrast = None if case.contrast is None else case.contrast.clone().requires_grad_()
        with pk.use_backend("cuda"):
            loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, contrast, case.contrast_labels)
            loss.backward()
        return loss, anchors.grad, None if contrast is None else contrast.grad

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)


def _gpu_backends() -> list[str]:
    return ["cuda"] + (["triton"] if unavailable_reason("triton") is None else [])


def _head_step(x: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward and backward of a ProtoSeg head step; returns the loss (x gets .grad)."""
    k = prototypes.shape[1]
    out = pk.class_scores(x, prototypes, return_index=True, lse_temperature=0.1)
    assignment = pk.sinkhorn_assign(x.detach(), prototypes, labels)
    target = torch.where(labels >= 0, labels * k + assignment.index.clamp_min(0), -1)
    ppc, ppd = pk.ppc_ppd_loss(x, prototypes, target, temperature=0.1, validate=False)
    loss = out.scores.logsumexp(1).mean() + 0.01 * ppc + 0.001 * ppd
    loss.backward()
    pk.update_prototypes(prototypes, x.detach(), labels, assignment.index, mask=out.scores.argmax(1) == labels,
                         validate=False)
    return loss.detach()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_head_step_cuda_triton_reference(dtype, record_property):
    """A Cityscapes-sized head step (docs/spec.md §7) per backend: cuda and triton agree with the
    reference on the loss and dx, and their times are reported."""
    require_cuda_build()
    case = make_case(65_536, 720, 19, 10, dtype=dtype, seed=7)
    x, prototypes, labels = case.x.cuda(), case.prototypes.cuda(), case.labels.cuda()
    times, losses, grads = {}, {}, {}
    for backend in _gpu_backends() + ["reference"]:
        with pk.use_backend(backend):
            samples = []
            for _ in range(6):
                leaf = x.clone().requires_grad_()
                torch.cuda.synchronize()
                start = time.perf_counter()
                losses[backend] = _head_step(leaf, prototypes, labels)
                torch.cuda.synchronize()
                samples.append(time.perf_counter() - start)
                grads[backend] = leaf.grad
        times[backend] = statistics.median(samples[1:])  # the first run compiles and warms up
        record_property(f"{backend}_ms", round(times[backend] * 1e3, 3))
    print("\n" + "  ".join(f"{name}: {t * 1e3:.2f} ms" for name, t in times.items()))
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for backend in _gpu_backends():
        assert_close(losses[backend].float(), losses["reference"].float(), tolerance, f"{backend} loss")
        assert_close(grads[backend].float(), grads["reference"].float(), tolerance, f"{backend} dx")
