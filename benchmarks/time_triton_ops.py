"""Median GPU time of each op on the triton backend against the reference backend, at
the docs/spec.md §7 presets (``triton.testing.do_bench``, median of repeated runs).

    python benchmarks/time_triton_ops.py [--dtype bf16] [--presets ade20k,cityscapes]

Needs a CUDA GPU. Forward-and-backward rows time ``loss.backward()`` after the
forward; the reference may run out of memory at the larger presets (reported).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _presets() -> dict[str, tuple[int, int, int, int]]:
    """docs/spec.md §7 presets of benchmarks/problems.py: name -> (N per GPU, D, C, K)."""
    problems = importlib.import_module(f"{__package__}.problems" if __package__ else "problems")
    return {name: (p.n_gpu, p.d, p.c, p.k) for name, p in problems.PRESETS.items()}


def _inputs(n: int, d: int, c: int, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n,), generator=g)
    return {
        "x": torch.randn(n, d, generator=g).to("cuda", dtype).requires_grad_(),
        "p": torch.randn(c, k, d, generator=g).to("cuda", dtype),
        "labels": labels.cuda(),
        "target": (labels * k + torch.randint(0, k, (n,), generator=g)).cuda(),
        "index": torch.randint(0, k, (n,), generator=g).cuda(),
    }


def _cases(t: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    import protoseg_kernels as pk

    def scores_fwd_bwd():
        out = pk.class_scores(t["x"], t["p"], lse_temperature=0.1)
        (out.scores.float().sum() + out.lse.sum()).backward()

    def ppc_fwd_bwd():
        ppc, ppd = pk.ppc_ppd_loss(t["x"], t["p"], t["target"], temperature=0.1, validate=False)
        (ppc + ppd).backward()

    return {
        "class_scores fwd": lambda: pk.class_scores(t["x"].detach(), t["p"], lse_temperature=0.1),
        "class_scores fwd+bwd": scores_fwd_bwd,
        "ppc_ppd_loss fwd+bwd": ppc_fwd_bwd,
        "sinkhorn_assign": lambda: pk.sinkhorn_assign(t["x"], t["p"], t["labels"], validate=False),
        "update_prototypes": lambda: pk.update_prototypes(t["p"], t["x"], t["labels"], t["index"], validate=False),
    }


def _median_ms(fn: Callable[[], object]) -> str:
    from triton.testing import do_bench

    try:
        return f"{do_bench(fn, return_mode='median'):.3f}"
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    presets = _presets()
    parser.add_argument("--presets", default=",".join(presets))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import protoseg_kernels as pk

    print(f"{torch.cuda.get_device_name()}, {args.dtype}, median ms")
    print(f"{'preset':<12}{'op':<24}{'triton':>10}{'reference':>11}{'speed-up':>10}")
    for name in args.presets.split(","):
        tensors = _inputs(*presets[name], DTYPES[args.dtype])
        for op, fn in _cases(tensors).items():
            times = {}
            for backend in ("triton", "reference"):
                with pk.use_backend(backend):
                    times[backend] = _median_ms(fn)
            ratio = "" if "OOM" in times.values() else f"{float(times['reference']) / float(times['triton']):.1f}x"
            print(f"{name:<12}{op:<24}{times['triton']:>10}{times['reference']:>11}{ratio:>10}")
        del tensors
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
