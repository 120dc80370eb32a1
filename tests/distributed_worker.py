"""Worker for the 2-process gloo tests (spawned by test_distributed.py): each rank
runs the ops on its own shard of pixels, with and without the process group, and
saves its results for the parent to compare."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import protoseg_kernels as pk


def run_rank(rank: int, world: int, init_file: str, out_dir: str, shards: list[dict], backend: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = shards[rank]
        with pk.use_backend(backend):
            results = {}
            for name, group in (("global", dist.group.WORLD), ("local", None)):
                sk = pk.sinkhorn_assign(shard["x"], shard["prototypes"], shard["labels"], return_q=True,
                                        process_group=group, epsilon=0.1, iterations=4)
                up = pk.update_prototypes(shard["prototypes"], shard["x"], shard["labels"], sk.index,
                                          mask=shard["mask"], momentum=0.8, process_group=group)
                results[name] = {"index": sk.index, "q": sk.q, "prototypes": up.prototypes,
                                 "counts": up.counts}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _head_steps(head, batches, compiled: bool) -> list[dict]:
    """Training forwards + backward of the head; what each step saw and produced."""
    forward = torch.compile(head, fullgraph=True) if compiled else head
    records = []
    for features, labels in batches:
        features = features.clone().requires_grad_()
        out = forward(features, labels)
        (out.seg.logsumexp(dim=1).mean() + out.ppc + out.ppd).backward()
        records.append({"target": out.target, "ppc": out.ppc.detach(), "ppd": out.ppd.detach(),
                        "grad": features.grad, "prototypes": head.prototypes.clone()})
    return records


def run_compiled_head(rank: int, world: int, init_file: str, out_dir: str, case: dict, backend: str) -> None:
    """ProtoSegHead with the WORLD group, eager and under torch.compile(fullgraph=True)."""
    from protoseg import ProtoSegHead

    torch.set_num_threads(1)  # two processes share the cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = [tuple(t[rank::world] for t in batch) for batch in case["batches"]]
        results = {}
        with pk.use_backend(backend):
            for mode in ("eager", "compiled"):
                torch.manual_seed(0)
                head = ProtoSegHead(*case["head"], projection="linear", momentum=0.8, ignore_index=255,
                                    process_group=dist.group.WORLD, validate_labels=False).double()
                results[mode] = _head_steps(head, batches, compiled=mode == "compiled")
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
