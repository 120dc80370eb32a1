"""Worker of test_protoseg_distributed.py: each rank trains a ProtoSegHead wrapped
in DistributedDataParallel on its shard of a batch and saves what it saw."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from protoseg import PixelPrototypeCELoss


def train_steps(model, loss_fn, shards, make_generator=None, lr=0.1):
    """SGD steps, one shard (features, labels) each; returns per-step records."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    records = []
    for step, (features, labels) in enumerate(shards):
        generator = make_generator(step) if make_generator else None
        out = model(features, labels, generator=generator)
        terms = loss_fn(out, labels)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
        head = model.module if isinstance(model, DistributedDataParallel) else model
        records.append({"terms": torch.stack(list(terms)).detach(), "target": out.target,
                        "prototypes": head.prototypes.clone()})
    return records


def run_rank(rank: int, world: int, init_file: str, out_dir: str, case: dict) -> None:
    torch.set_num_threads(1)  # two processes share the cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from test_protoseg_distributed import make_head, shard

        loss_fn = PixelPrototypeCELoss(ignore_index=case["ignore_index"])
        steps = [shard(batch, rank) for batch in case["batches"]]
        results = {mode: train_mode(mode, rank, loss_fn, steps, make_head) for mode in ("global", "compat")}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        gc.collect()  # the DDP wrappers go before the group (see protoseg.trainer.Trainer.close)
        dist.destroy_process_group()


def train_mode(mode: str, rank: int, loss_fn, steps, make_head) -> dict:
    head = make_head(compat="protoseg" if mode == "compat" else None, process_group=dist.group.WORLD)
    model = DistributedDataParallel(head)
    records = train_steps(model, loss_fn, steps, lambda step: torch.Generator().manual_seed(1000 * rank + step))
    return {"records": records, "parameters": dict(head.named_parameters())}
