"""process_group semantics (docs/spec.md §3.4, §3.5) with 2 gloo processes on CPU: with the
group every rank gets the single-process result on the concatenated pixels; without
it each rank gets its local result. Validation under the group is collective (docs/spec.md §3):
a bad value on one rank makes every rank raise the same error."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FUSED_CPU_BACKENDS, require_backend
from distributed_worker import run_rank
from helpers import assert_close, assert_index_match, make_case, top2_gap

import protoseg_kernels as pk

SIZES = (613, 418)  # ragged shards of different sizes


def _shards():
    case = make_case(sum(SIZES), 24, 6, 5, seed=17, peaked_fraction=0.3)
    mask = torch.rand(sum(SIZES), generator=torch.Generator().manual_seed(3)) < 0.8
    full = {"x": case.x.float(), "prototypes": case.prototypes.float(), "labels": case.labels, "mask": mask}
    cuts = [0, SIZES[0], sum(SIZES)]
    shards = [{k: (v if k == "prototypes" else v[cuts[r]:cuts[r + 1]]) for k, v in full.items()} for r in range(2)]
    return full, shards


def _single_process(data, backend):
    with pk.use_backend(backend):
        sk = pk.sinkhorn_assign(data["x"], data["prototypes"], data["labels"], return_q=True, epsilon=0.1,
                                iterations=4)
        up = pk.update_prototypes(data["prototypes"], data["x"], data["labels"], sk.index, mask=data["mask"],
                                  momentum=0.8)
    return sk, up


@pytest.mark.parametrize("backend", ("reference",) + FUSED_CPU_BACKENDS)
def test_two_gloo_ranks_match_single_process(backend, tmp_path):
    if backend != "reference":
        require_backend(backend)
    full, shards = _shards()
    mp.spawn(run_rank, args=(2, str(tmp_path / "init"), str(tmp_path), shards, backend), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    sk, up = _single_process(full, backend)
    global_index = torch.cat([r["global"]["index"] for r in results])
    global_q = torch.cat([r["global"]["q"] for r in results])
    assert_close(global_q, sk.q, 1e-5, "q")
    assert_index_match(global_index, sk.index, top2_gap(sk.q), 1e-5)
    for r in results:
        assert torch.equal(r["global"]["prototypes"], results[0]["global"]["prototypes"]), "ranks disagree"
        assert torch.equal(r["global"]["counts"], up.counts)
    # Same assignment on both sides, so the update must match closely.
    up_same_index = _single_process_update(full, global_index, backend)
    assert_close(results[0]["global"]["prototypes"], up_same_index.prototypes, 1e-6, "prototypes")

    for rank, shard in enumerate(shards):
        local_sk, local_up = _single_process(shard, backend)
        assert torch.equal(results[rank]["local"]["index"], local_sk.index)
        assert torch.equal(results[rank]["local"]["q"], local_sk.q)
        assert torch.equal(results[rank]["local"]["prototypes"], local_up.prototypes)
    # The global clustering really differs from the per-rank one on this data.
    assert not torch.equal(results[0]["global"]["q"], results[0]["local"]["q"])


def _single_process_update(data, index, backend):
    with pk.use_backend(backend):
        return pk.update_prototypes(data["prototypes"], data["x"], data["labels"], index,
                                    mask=data["mask"], momentum=0.8)


HEAD = (10, 4, 3, 8)  # in_channels, C, K, D


def _head_batches():
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(2):
        features = torch.randn(4, HEAD[0], 6, 5, generator=g, dtype=torch.float64)
        labels = torch.randint(0, HEAD[1], (4, 12, 10), generator=g)
        batches.append((features, torch.where(torch.rand(4, 12, 10, generator=g) < 0.2, 255, labels)))
    return batches


def _single_process_targets(batches, backend):
    """One process on the concatenated pixels (no group): targets and prototypes per step."""
    from protoseg import ProtoSegHead

    torch.manual_seed(0)
    head = ProtoSegHead(*HEAD, projection="linear", momentum=0.8, ignore_index=255).double()
    records = []
    with pk.use_backend(backend):
        for features, labels in batches:
            # Rank r holds images r, r + 2: their pixels, concatenated in rank order.
            order = torch.tensor([0, 2, 1, 3])
            out = head(features[order], labels[order])
            records.append({"target": out.target, "prototypes": head.prototypes.clone()})
    return records


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_compiled_head_step_with_two_gloo_ranks(backend, tmp_path):
    """torch.compile(fullgraph=True) of ProtoSegHead's training step with a 2-rank gloo
    group: the collectives run inside the ops, and every step equals the eager run,
    which equals one process on the concatenated pixels."""
    from distributed_worker import run_compiled_head

    if backend != "reference":
        require_backend(backend)
    batches = _head_batches()
    case = {"batches": batches, "head": HEAD}
    mp.spawn(run_compiled_head, args=(2, str(tmp_path / "init"), str(tmp_path), case, backend), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _single_process_targets(batches, backend)
    for step, expected in enumerate(single):
        for r in ranks:
            eager, compiled = r["eager"][step], r["compiled"][step]
            assert torch.equal(compiled["target"], eager["target"]), f"step {step}: compiled targets"
            for name in ("ppc", "ppd", "grad", "prototypes"):
                assert_close(compiled[name], eager[name], 1e-12, f"step {step}: compiled {name}")
            assert_close(eager["prototypes"], expected["prototypes"], 1e-12, f"step {step}: prototypes")
        assert torch.equal(torch.cat([r["eager"][step]["target"] for r in ranks]), expected["target"])


# Per API: what every rank must raise in each scenario of distributed_worker.VALIDATION_SCENARIOS.
RANGE_HINT = "(pass validate=False to treat out-of-range values as ignored)"
COLLECTIVE_ERRORS = {
    "sinkhorn_assign": [
        "ValueError: sinkhorn_assign: labels must hold class indices in [0, 4) or ignore_index=-1, "
        f"found 7 on rank 1 of the process group {RANGE_HINT}",
        "ValueError: sinkhorn_assign: labels must hold class indices in [0, 4) or ignore_index=-1, "
        f"found -3 on rank 1 of the process group {RANGE_HINT}",
    ],
    "update_prototypes": [
        "ValueError: update_prototypes: labels must hold class indices in [0, 4) or ignore_index=-1, "
        f"found 9 on rank 1 of the process group {RANGE_HINT}",
        "ValueError: update_prototypes: index must hold prototype indices in [0, 3) or -1 (unassigned), "
        f"found 5 on rank 0 of the process group {RANGE_HINT}",
    ],
    "ClassMemoryBank.enqueue": [
        "ValueError: ClassMemoryBank.enqueue: labels must hold classes in [0, 4) or ignore_index=255, "
        f"found 12 on rank 1 of the process group {RANGE_HINT}",
    ],
    "heads": [
        "ValueError: labels must hold classes in [0, 4) or ignore_index=255, found 5 on rank 1 of the process group",
        "ValueError: labels must hold classes in [0, 4) or ignore_index=255, found -2 on rank 1 of the process group",
    ],
    "check_class_ids": [
        "ValueError: op: labels must hold class ids >= 0 or ignore_index=-1, found -4 on rank 0 of the process group "
        "(pass validate=False to treat negative values as ignored)",
    ],
}


@pytest.fixture(scope="module")
def collective_outcomes(tmp_path_factory):
    """What each of 2 gloo ranks raised in every scenario (one spawn for all of them)."""
    from distributed_worker import run_collective_validation

    out = tmp_path_factory.mktemp("collective_validation")
    mp.spawn(run_collective_validation, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("api", sorted(COLLECTIVE_ERRORS))
def test_a_bad_value_on_one_rank_raises_on_every_rank(api, collective_outcomes):
    """With a process group, validation is collective: a bad label (or index) on one rank
    makes every rank raise the same ValueError at once, naming the value and its rank,
    instead of one rank raising while the other waits in the op's all-reduce until the
    group's timeout (20 s in the worker, so a regression fails fast rather than hanging)."""
    rank0, rank1 = (ranks[api] for ranks in collective_outcomes)
    assert rank0 == rank1, f"ranks disagree:\nrank 0: {rank0}\nrank 1: {rank1}"
    assert rank0 == COLLECTIVE_ERRORS[api]


def test_ranks_stay_in_step_after_a_collective_validation_error(collective_outcomes):
    """Every rank ran the same collectives before raising: the next all-reduce pairs up."""
    assert [ranks["after"] for ranks in collective_outcomes] == [["in step: 2 ranks"]] * 2
