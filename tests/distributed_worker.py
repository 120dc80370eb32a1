"""Worker for the 2-process gloo tests (spawned by test_distributed.py): each rank
runs the ops on its own shard of pixels, with and without the process group, and
saves its results (or, for the collective validation scenarios, its errors) for the
parent to compare."""

from __future__ import annotations

import datetime
import json
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


# ------------------------------------------------------------ collective validation
# Each scenario runs one API on this rank's data (good on one rank, bad on the other) and
# returns nothing: the test wants the ValueError it raises. C classes, K prototypes, D dims.
C, K, D = 4, 3, 8


def _pixels(rank: int, n: int, bad_rank: int | None, bad_value: int, ignore_index: int = -1):
    g = torch.Generator().manual_seed(11 + rank)
    x = torch.randn(n, D, generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    labels[::5] = ignore_index
    if rank == bad_rank:
        labels[n // 2] = bad_value
    prototypes = torch.nn.functional.normalize(torch.randn(C, K, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    return x, prototypes, labels


def _sinkhorn_bad_label(rank: int) -> None:
    x, prototypes, labels = _pixels(rank, 40, bad_rank=1, bad_value=7)
    pk.sinkhorn_assign(x, prototypes, labels, process_group=dist.group.WORLD)


def _sinkhorn_empty_shard(rank: int) -> None:
    # rank 0 has no pixels at all: it must still take part in the check
    x, prototypes, labels = _pixels(rank, 40 if rank else 0, bad_rank=1, bad_value=-3)
    pk.sinkhorn_assign(x, prototypes, labels, process_group=dist.group.WORLD, iterations=2)


def _update_bad_label(rank: int) -> None:
    x, prototypes, labels = _pixels(rank, 40, bad_rank=1, bad_value=9)
    index = torch.zeros_like(labels)
    pk.update_prototypes(prototypes, x, labels, index, process_group=dist.group.WORLD)


def _update_bad_index(rank: int) -> None:
    x, prototypes, labels = _pixels(rank, 40, bad_rank=None, bad_value=0)
    index = torch.zeros_like(labels)
    if rank == 0:
        index[3] = K + 2
    pk.update_prototypes(prototypes, x, labels, index, process_group=dist.group.WORLD)


def _enqueue_bad_label(rank: int) -> None:
    bank = pk.ClassMemoryBank(C, 6, D, ignore_index=255)
    g = torch.Generator().manual_seed(rank)
    embedding = torch.randn(2, D, 5, 4, generator=g)
    labels = torch.randint(0, C, (2, 5, 4), generator=g)
    if rank == 1:
        labels[1, 2, 3] = 12
    bank.enqueue(embedding, labels, generator=g, process_group=dist.group.WORLD)


def _head_labels(rank: int, bad_value: int) -> torch.Tensor:
    labels = torch.randint(0, C, (2, 8, 8), generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        labels[0, 4, 4] = bad_value
    return labels


def _protoseg_head_bad_label(rank: int) -> None:
    from protoseg import ProtoSegHead

    head = ProtoSegHead(6, C, K, D, projection="linear", ignore_index=255, process_group=dist.group.WORLD)
    head(torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(rank)), _head_labels(rank, 5))


def _contrast_head_bad_label(rank: int) -> None:
    from protoseg import ContrastHead

    head = ContrastHead(6, C, D, contrast_set="bank", memory_size=6, pixels_per_class=2, ignore_index=255,
                        process_group=dist.group.WORLD)
    head(torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(rank)), _head_labels(rank, -2))


def _class_ids_bad_on_both(rank: int) -> None:
    # the shared helper of the contrast ops: both ranks bad, the lowest rank is named
    from protoseg_kernels._checks import check_class_ids

    labels = torch.tensor([[0, 3], [-1, -4 - rank]])
    check_class_ids("op", "labels", labels, -1, dist.group.WORLD)


VALIDATION_SCENARIOS = {
    "sinkhorn_assign": (_sinkhorn_bad_label, _sinkhorn_empty_shard),
    "update_prototypes": (_update_bad_label, _update_bad_index),
    "ClassMemoryBank.enqueue": (_enqueue_bad_label,),
    "heads": (_protoseg_head_bad_label, _contrast_head_bad_label),
    "check_class_ids": (_class_ids_bad_on_both,),
}


def run_collective_validation(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Run every scenario under the WORLD group and save, per API and scenario, what this
    rank raised ("ValueError: <message>", or another exception's type and message), then
    whether the ranks are still in step (an all-reduce after the errors). The short timeout
    makes a rank left waiting in a collective fail within seconds, not after 30 minutes."""
    torch.set_num_threads(1)  # two processes share the cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    outcomes: dict[str, list[str]] = {}
    try:
        with pk.use_backend("reference"):
            for api, scenarios in VALIDATION_SCENARIOS.items():
                outcomes[api] = [_outcome(scenario, rank) for scenario in scenarios]
        outcomes["after"] = [_outcome(_ranks_in_step, rank)]
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(outcomes, f)
        dist.destroy_process_group()


def _ranks_in_step(rank: int) -> str:
    total = torch.ones(1)
    dist.all_reduce(total)
    return f"in step: {int(total)} ranks"


def _outcome(scenario, rank: int) -> str:
    """What ``scenario`` returned ("no error" for None), or the exception it raised."""
    try:
        result = scenario(rank)
    except Exception as error:  # noqa: BLE001 - recorded for the parent to compare
        return f"{type(error).__name__}: {error}"
    return "no error" if result is None else result
