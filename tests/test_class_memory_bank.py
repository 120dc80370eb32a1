"""``pk.ClassMemoryBank`` (docs/spec.md §10.3) against a literal per-image, per-class loop."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import protoseg_kernels as pk
from benchmarks.measure import Case, profile_case

C, L, D = 5, 7, 6


def literal_enqueue(state, embedding, labels, priority, per_class, ignore_index=-1):
    """The ring semantics of docs/spec.md §10.3, one entry at a time, on plain lists."""
    features, slot_labels, pointers = state
    batch, _, height, width = embedding.shape
    x = embedding.double().reshape(batch, D, -1)
    flat, prio = labels.reshape(batch, -1), priority.reshape(batch, -1)
    for b in range(batch):
        for c in range(C):
            pixels = [i for i in range(height * width) if flat[b, i] == c]
            if not pixels:
                continue
            mean = F.normalize(x[b][:, pixels].mean(dim=1), dim=0)
            drawn = sorted(pixels, key=lambda i: (float(prio[b, i]), i))[:per_class]
            for queue, entries in ((0, [mean]), (1, [F.normalize(x[b][:, i], dim=0) for i in drawn])):
                for entry in entries:
                    features[queue][c][pointers[queue][c]] = entry
                    slot_labels[queue][c][pointers[queue][c]] = c
                    pointers[queue][c] = (pointers[queue][c] + 1) % L


def empty_state(ignore_index=-1):
    return (torch.zeros(2, C, L, D, dtype=torch.float64), torch.full((2, C, L), ignore_index),
            [[0] * C, [0] * C])


def random_batch(batch, height, width, seed, ignore_fraction=0.15):
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(batch, D, height, width, generator=g)
    weights = torch.tensor([0.5 ** c for c in range(C - 1)])  # class C-1 never appears
    labels = torch.multinomial(weights, batch * height * width, replacement=True, generator=g)
    labels = labels.view(batch, height, width)
    labels[torch.rand(batch, height, width, generator=g) < ignore_fraction] = -1
    return embedding, labels, torch.rand(batch, height, width, generator=g)


def assert_bank_equals(bank, state):
    features, slot_labels, pointers = state
    torch.testing.assert_close(bank.features.double(), features, atol=1e-6, rtol=1e-6)
    assert torch.equal(bank.labels, slot_labels)
    assert bank.pointers.tolist() == pointers


@pytest.mark.parametrize("per_class", [1, 3, 50])  # 50: more than L at once, the last L win
def test_successive_enqueues_match_the_literal_ring(per_class):
    bank, state = pk.ClassMemoryBank(C, L, D), empty_state()
    for step in range(4):
        embedding, labels, priority = random_batch(3, 5, 4, seed=step)
        bank.enqueue(embedding, labels, pixels_per_class=per_class, priority=priority)
        literal_enqueue(state, embedding, labels, priority, per_class)
        assert_bank_equals(bank, state)
    assert (bank.labels[:, C - 1] == -1).all(), "an absent class must stay empty"


def test_contrast_set_is_views_of_the_buffers():
    bank = pk.ClassMemoryBank(C, L, D)
    features, labels = bank.contrast_set()
    assert features.shape == (2 * C * L, D) and labels.shape == (2 * C * L,)
    assert features.data_ptr() == bank.features.data_ptr() and labels.data_ptr() == bank.labels.data_ptr()
    assert features._base is bank.features and labels._base is bank.labels


def test_the_state_dict_holds_the_bank_and_restores_it():
    bank = pk.ClassMemoryBank(C, L, D, ignore_index=255)
    assert (bank.labels == 255).all()
    embedding, labels, priority = random_batch(2, 4, 4, seed=3)
    bank.enqueue(embedding, torch.where(labels < 0, 255, labels), priority=priority)
    state = bank.state_dict()
    assert set(state) == {"features", "labels", "pointers"}
    restored = pk.ClassMemoryBank(C, L, D, ignore_index=255)
    restored.load_state_dict(state)
    for name in state:
        assert torch.equal(getattr(restored, name), getattr(bank, name))


def test_the_generator_makes_the_draw_reproducible():
    embedding, labels, _ = random_batch(2, 6, 6, seed=4)
    banks = [pk.ClassMemoryBank(C, L, D) for _ in range(3)]
    for bank, seed in zip(banks, (1, 1, 2)):
        bank.enqueue(embedding, labels, pixels_per_class=2, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(banks[0].features, banks[1].features)
    assert not torch.equal(banks[0].features[1], banks[2].features[1])


def test_pixels_come_from_their_own_class():
    embedding, labels, _ = random_batch(2, 8, 8, seed=5)
    bank = pk.ClassMemoryBank(C, 64, D)
    bank.enqueue(embedding, labels, pixels_per_class=4, generator=torch.Generator().manual_seed(0))
    pixels = F.normalize(embedding.permute(0, 2, 3, 1).reshape(-1, D), dim=1)
    flat = labels.reshape(-1)
    for c in range(C - 1):
        stored = bank.features[1, c][bank.labels[1, c] == c]
        assert stored.shape[0] == sum(min(4, int((labels[b] == c).sum())) for b in range(2))
        nearest = (stored @ pixels.T).argmax(dim=1)
        assert (flat[nearest] == c).all()


def test_low_precision_embeddings_are_stored_in_the_bank_dtype():
    embedding, labels, priority = random_batch(2, 4, 4, seed=6)
    bank, state = pk.ClassMemoryBank(C, L, D), empty_state()
    bank.enqueue(embedding.bfloat16(), labels, priority=priority)
    literal_enqueue(state, embedding.bfloat16().double(), labels, priority, 10)
    assert bank.features.dtype == torch.float32
    assert_bank_equals(bank, state)


def test_enqueue_without_host_synchronisation():
    embedding, labels, _ = random_batch(2, 8, 8, seed=7)
    bank = pk.ClassMemoryBank(C, L, D)
    g = torch.Generator().manual_seed(0)

    def step(_):
        bank.enqueue(embedding, labels, generator=g, validate=False)

    assert profile_case(Case(lambda: None, step), torch.device("cpu")).host_syncs == 0


def test_out_of_range_labels_raise_or_are_skipped():
    embedding, labels, priority = random_batch(1, 3, 3, seed=8)
    labels[0, 0, 0] = C
    bank = pk.ClassMemoryBank(C, L, D)
    with pytest.raises(ValueError, match=r"labels must hold classes in \[0, 5\)"):
        bank.enqueue(embedding, labels)
    bank.enqueue(embedding, labels, priority=priority, validate=False)
    state = empty_state()
    literal_enqueue(state, embedding, torch.where(labels >= C, -1, labels), priority, 10)
    assert_bank_equals(bank, state)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"embedding": torch.zeros(1, D, 2)}, ValueError, r"embedding must have shape \[B, D, h, w\]"),
    ({"embedding": torch.zeros(1, D + 1, 2, 2)}, ValueError, "embedding must have D = 6"),
    ({"labels": torch.zeros(1, 3, 2, dtype=torch.long)}, ValueError, r"labels must have shape \[B, h, w\]"),
    ({"labels": torch.zeros(1, 2, 2)}, TypeError, "labels must be an integer tensor"),
    ({"pixels_per_class": 0}, ValueError, "pixels_per_class must be >= 1"),
    ({"priority": torch.zeros(1, 3, 3)}, ValueError, "priority must be a floating"),
    ({"process_group": object()}, RuntimeError, "torch.distributed is not initialised"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = {"embedding": torch.zeros(1, D, 2, 2), "labels": torch.zeros(1, 2, 2, dtype=torch.long), **kwargs}
    with pytest.raises(error, match=match):
        pk.ClassMemoryBank(C, L, D).enqueue(args.pop("embedding"), args.pop("labels"), **args)


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="size must be >= 1"):
        pk.ClassMemoryBank(C, 0, D)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        pk.ClassMemoryBank(C, L, D, dtype=torch.int32)


# ------------------------------------------------------------------ two gloo ranks
def _bank_rank(rank, world, init_file, out_dir, batches):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bank = pk.ClassMemoryBank(C, L, D)
        for embedding, labels, priority in batches[rank]:
            bank.enqueue(embedding, labels, pixels_per_class=3, priority=priority, process_group=dist.group.WORLD)
        torch.save(bank.state_dict(), os.path.join(out_dir, f"bank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_hold_the_bank_of_the_concatenated_batch(tmp_path):
    steps = [random_batch(4, 5, 5, seed=20 + s) for s in range(3)]
    shards = [[tuple(t[2 * r:2 * r + 2] for t in step) for step in steps] for r in range(2)]
    mp.spawn(_bank_rank, args=(2, str(tmp_path / "init"), str(tmp_path), shards), nprocs=2, join=True)
    banks = [torch.load(tmp_path / f"bank{r}.pt") for r in range(2)]
    single = pk.ClassMemoryBank(C, L, D)
    for embedding, labels, priority in steps:
        single.enqueue(embedding, labels, pixels_per_class=3, priority=priority)
    for name, value in single.state_dict().items():
        assert torch.equal(banks[0][name], banks[1][name]), f"ranks disagree on {name}"
        if name == "features":
            # The segment sums are one batched GEMM whose blocking may depend on the batch
            # size: the same entries, up to the last bit.
            torch.testing.assert_close(banks[0][name], value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(banks[0][name], value), f"{name} differs from one process on the whole batch"
