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
