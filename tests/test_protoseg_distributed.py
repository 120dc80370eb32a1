"""ProtoSegHead under DistributedDataParallel with 2 gloo processes on CPU.

Default semantics: the two ranks together compute exactly what one process computes
on the combined batch (Sinkhorn targets, updated prototypes, losses, parameters after
the optimizer steps). ``compat="protoseg"``: each rank clusters and updates on its
own pixels, then the ranks' prototypes are averaged, as the original code does."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from protoseg_ddp_worker import train_steps
from protoseg_fixtures import single_thread  # noqa: F401 (autouse fixture)

from protoseg import PixelPrototypeCELoss, ProtoSegHead

IGNORE = 255
C, K, C_IN, D = 4, 3, 10, 8
WORLD = 2


def make_head(**options) -> ProtoSegHead:
    torch.manual_seed(0)
    return ProtoSegHead(C_IN, C, K, D, projection="linear", momentum=0.8, ignore_index=IGNORE, **options).double()


def make_batch(seed: int, images_per_rank: int = 2):
    """A batch whose shards have the same ignored positions, so each rank's means
    (CE, PPC, PPD) are over as many pixels as the other's and their average is the
    mean over the combined batch."""
    g = torch.Generator().manual_seed(seed)
    b = images_per_rank * WORLD
    features = torch.randn(b, C_IN, 6, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (b, 12, 10), generator=g)
    ignored = torch.rand(images_per_rank, 12, 10, generator=g) < 0.2
    labels[ignored.repeat(WORLD, 1, 1)] = IGNORE
    return features, labels


def shard(batch, rank: int):
    per_rank = batch[0].shape[0] // WORLD
    return tuple(t[rank * per_rank:(rank + 1) * per_rank] for t in batch)


def assert_close(actual, expected, name, tol=1e-10):
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(expected.abs().max().item(), 1.0), f"{name}: max error {err:.3e}"


def test_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    batches = [make_batch(seed) for seed in (1, 2, 3)]
    case = {"batches": batches, "ignore_index": IGNORE}
    mp.spawn(run_rank_entry, args=(WORLD, str(tmp_path / "init"), str(tmp_path), case), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    loss_fn = PixelPrototypeCELoss(ignore_index=IGNORE)

    # Default (global) semantics against one process on the whole batch.
    single_head = make_head()
    single = train_steps(single_head, loss_fn, batches)
    for step, expected in enumerate(single):
        got = [r["global"]["records"][step] for r in ranks]
        assert torch.equal(torch.cat([g["target"] for g in got]), expected["target"]), f"targets, step {step}"
        for g in got:
            assert_close(g["prototypes"], expected["prototypes"], f"prototypes, step {step}")
        assert_close((got[0]["terms"] + got[1]["terms"]) / WORLD, expected["terms"], f"losses, step {step}")
    for name, value in single_head.named_parameters():
        for r in ranks:
            assert_close(r["global"]["parameters"][name], value.detach(), f"parameter {name}")

    # Compat: per-rank clustering and update, then the average of the ranks' prototypes.
    per_rank = []
    for rank in range(WORLD):
        head = make_head(compat="protoseg")
        records = train_steps(head, loss_fn, [shard(b, rank) for b in batches],
                              lambda step, rank=rank: torch.Generator().manual_seed(1000 * rank + step))
        per_rank.append(records)
    # Only the first step starts from the same prototypes on both sides.
    expected = (per_rank[0][0]["prototypes"] + per_rank[1][0]["prototypes"]) / WORLD
    for r in ranks:
        assert_close(r["compat"]["records"][0]["prototypes"], expected, "compat prototypes")
    for rank in range(WORLD):
        assert torch.equal(ranks[rank]["compat"]["records"][0]["target"], per_rank[rank][0]["target"])
    assert not torch.allclose(ranks[0]["compat"]["records"][0]["prototypes"], single[0]["prototypes"])


def run_rank_entry(rank, world, init_file, out_dir, case):
    from protoseg_ddp_worker import run_rank

    run_rank(rank, world, init_file, out_dir, case)


def test_cli_under_torchrun_shards_training_and_evaluation(tmp_path):
    """``torchrun`` with 2 gloo processes: training runs, and the evaluation (each rank
    scores its share of the images, the confusion matrices are summed) equals a
    single-process evaluation of the saved model."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from protoseg.checkpoint import model_from_checkpoint
    from protoseg.data import IGNORE_INDEX, build_datasets
    from protoseg.evaluation import evaluate

    run_dir = tmp_path / "run"
    overrides = ["model.width=8", "model.embed_dim=8", "model.num_prototypes=2", "data.synthetic_train_images=16",
                 "data.synthetic_val_images=5", "data.synthetic_image_size=32", "data.crop_size=[32,32]",
                 "data.batch_size=2", "data.val_batch_size=2", "optim.optimizer=adamw", "optim.lr=0.01",
                 "optim.iters=30", "train.progress=false",
                 f"train.output_dir={run_dir}"]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "protoseg.train", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())

    model, config, class_names, _ = model_from_checkpoint(run_dir / "last.pt")
    val = build_datasets(config.data).val
    batches = [(image[None], labels[None]) for image, labels in (val[i] for i in range(len(val)))]
    matrix = evaluate(model, batches, len(class_names), IGNORE_INDEX, torch.device("cpu"))
    assert int(matrix.counts.sum()) == sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
    assert matrix.summary(class_names) == {k: v for k, v in metrics.items() if k != "iter"}
    assert int(matrix.counts.diagonal()[1:].sum()) > 0, "the test needs predictions beyond the background"


def test_trainer_close_frees_the_ddp_wrapper_before_leaving_the_group(tmp_path, monkeypatch):
    """Left to interpreter shutdown, gloo's DDP teardown now and then aborts a rank after a
    run that succeeded; ``Trainer.close`` frees the wrapper while the group still exists."""
    import weakref

    import torch.distributed as dist
    from protoseg_fixtures import write_tiny_training_config
    from torch.nn.parallel import DistributedDataParallel

    from protoseg.config import load_config
    from protoseg.distributed import DistributedContext
    from protoseg.trainer import Trainer

    config = load_config(str(write_tiny_training_config(tmp_path, iters=1)), (f"train.output_dir={tmp_path / 'run'}",))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer = Trainer(config, DistributedContext(0, 1, torch.device("cpu"), dist.group.WORLD))
        trainer.train()
        wrapper = weakref.ref(trainer.train_model)
        assert isinstance(wrapper(), DistributedDataParallel)
        wrapper_alive_at_destroy = []
        destroy = dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group",
                            lambda: (wrapper_alive_at_destroy.append(wrapper() is not None), destroy()))
        trainer.close()
        assert wrapper_alive_at_destroy == [False]
        assert not dist.is_initialized() and trainer.context.group is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
