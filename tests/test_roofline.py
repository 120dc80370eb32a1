"""The per-op roofline model (``python -m benchmarks.roofline --ops``).

* Its byte counts are ordered as a model of a fused kernel must be: the floor
  (compulsory bytes) <= the Triton kernels' HBM bytes, and for the ops that the
  naive code runs through N×C·K tensors, the kernels' bytes <= the naive op's;
  no kernel pass is N×C·K in size.
* Its useful FLOPs are those of ``benchmarks.flops``.
* The launch structure it models (how many launches, which tiles) is what the
  Triton launchers do: they are called on meta tensors of the preset's shapes
  with their launches recorded (nothing runs, no GPU needed).
* The CLI prints a row per op and mode, and the step table by default.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import flops, roofline, roofline_ops  # noqa: E402
from benchmarks.problems import PRESETS  # noqa: E402

ADE20K = PRESETS["ade20k"]
PROBLEM = ADE20K.problem(ADE20K.n_gpu)
NCK_OPS = ("class_scores", "ppc_ppd_loss")
ROW_NAMES = ["class_scores fwd", "class_scores bwd", "ppc_ppd_loss fwd", "ppc_ppd_loss bwd", "sinkhorn_assign fwd",
             "update_prototypes fwd"]


@pytest.fixture(scope="module")
def tiles():
    return roofline_ops.triton_tiles(PROBLEM)


@pytest.fixture(scope="module")
def rows(tiles):
    return roofline_ops.op_rows(PROBLEM, tiles)


def test_a_row_per_op_and_mode(rows):
    assert [row.name for row in rows] == ROW_NAMES


@pytest.mark.parametrize("element", [4, 2])
def test_compulsory_le_kernel_le_naive(rows, element):
    for row in rows:
        compulsory, kernel, naive = (roofline_ops.pass_bytes(passes, PROBLEM, element)
                                     for passes in (row.compulsory, row.kernel, row.naive))
        assert 0 < compulsory <= kernel, row.name
        if row.op in NCK_OPS:
            assert kernel <= naive, row.name
            assert any(shape == "N·C·K" for _, shape, _ in row.naive.values()), row.name
        assert all(shape != "N·C·K" for _, shape, _ in row.kernel.values()), row.name  # docs/spec.md §3: no N·C·K


def test_flops_are_those_of_benchmarks_flops(rows):
    for row in rows:
        assert row.useful_flops == flops.op_flops(row.op, row.mode, PROBLEM), row.name
    by_name = {row.name: row for row in rows}
    gemm = flops.similarity_flops(PROBLEM)
    for op in NCK_OPS:  # the kernel backward recomputes S; the naive one kept it
        assert by_name[f"{op} bwd"].kernel_flops == 2 * gemm
        assert by_name[f"{op} bwd"].naive_flops == gemm


def test_modelled_launches_are_the_launchers(tiles):
    """One launch per GEMM op (normalize=False, no prototype gradient) with the modelled tiles;
    Sinkhorn's logits, two launches per class reduction, finalize; the update's two kernels."""
    from protoseg_kernels import triton as tk
    from protoseg_kernels._distributed import LOCAL
    from protoseg_kernels.sinkhorn_assign import run_sinkhorn
    from protoseg_kernels.triton._host import recording_launches
    from protoseg_kernels.update_prototypes import run_update

    n, d, c, k = PROBLEM.n, PROBLEM.d, PROBLEM.c, PROBLEM.k

    def empty(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    x, p, per_row = empty(n, d), empty(c, k, d), empty(n, dtype=torch.float32)
    labels, index = empty(n, dtype=torch.int64), empty(n, c, dtype=torch.int64)
    with recording_launches() as gemms:
        tk.class_scores_forward(x, p, False, "max", 1.0, 0.1)
        tk.class_scores_backward(empty(n, c), per_row, x, p, index, per_row, False, "max", 1.0, 0.1, False)
        tk.ppc_ppd_forward(x, p, labels, False, 0.1)
        tk.ppc_ppd_backward(per_row, per_row, x, p, labels, per_row, False, 0.1, False)
    modelled = (tiles.scores_forward, tiles.scores_backward, tiles.ppc_forward, tiles.ppc_backward)
    assert len(gemms) == len(modelled)
    for launch, t in zip(gemms, modelled):
        assert launch.grid == (roofline_ops.TritonTiles.pixel_blocks(t, PROBLEM),)
        assert [launch.kwargs[key] for key in ("BN", "KS", "BC", "FLAT")] == [t.block_n, t.k_slots, t.block_c, t.flat]

    with recording_launches() as sinkhorn:
        run_sinkhorn(tk, x, p, labels, False, 0.05, roofline_ops.ITERATIONS, -1, False, False, LOCAL)
    names = [launch.kernel.fn.__name__ for launch in sinkhorn]
    reductions = roofline_ops.SINKHORN_REDUCTIONS
    assert names == (["_own_class_logits_kernel"] + ["_class_partials_kernel", "_combine_partials_kernel"] * reductions
                     + ["_finalize_kernel"])
    assert sinkhorn[1].grid == (tiles.sinkhorn_chunks(PROBLEM), tiles.sinkhorn_class_blocks(PROBLEM))

    with recording_launches() as update:
        run_update(tk, p, x, labels, labels, empty(n, dtype=torch.bool), 0.999, False, -1, False, LOCAL)
    assert [launch.kernel.fn.__name__ for launch in update] == ["_segment_sums_kernel", "_momentum_kernel"]
    assert update[0].grid == (c * k, tiles.sums_chunks(PROBLEM))


def test_cli(capsys):
    assert roofline.main(["--ops", "--preset", "ade20k", "--passes"]) == 0
    out = capsys.readouterr().out
    for name in ROW_NAMES:
        op, mode = name.split()
        assert out.count(f"| {op} | {mode} |") == 1, name
        assert f"## {name}" in out
    assert roofline.main([]) == 0
    out = capsys.readouterr().out
    assert "| preset |" in out
    assert all(f"| {preset} |" in out for preset in PRESETS)


def test_contrast_roofline_counts_the_fused_passes_and_the_naive_a_by_m_traffic(capsys):
    from benchmarks import roofline_contrast
    from benchmarks.contrast_cases import PRESETS

    bank = PRESETS["bank"]
    one_pass = 2 * bank.n * bank.m * bank.d
    assert roofline_contrast.fused_flops(bank) == pytest.approx((3 + 1 / 19) * one_pass)  # (2 + 1/C) fwd + dx
    assert roofline_contrast.naive_flops(bank) == 2 * one_pass
    # The naive side moves A×M tensors; the fused side only the operands, once per pass.
    assert roofline_contrast.naive_bytes(bank, 2) > 100 * roofline_contrast.fused_bytes(bank, 2)
    assert roofline.main(["--contrast"]) == 0
    assert roofline_contrast.fused_flops(PRESETS["dense"]) == pytest.approx((3 + 1 / 19) * one_pass * 16)
    assert "dense | 32768 | 190000" in capsys.readouterr().out
