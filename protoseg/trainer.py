"""``Trainer``: the iteration-based training loop behind ``python -m protoseg.train``."""

from __future__ import annotations

import gc
import json
import math
import os
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from .config import Config, ConfigError
from .data import IGNORE_INDEX, EpochBatchSampler, build_datasets, pad_collate
from .distributed import DistributedContext
from .evaluation import ConfusionMatrix, evaluate, format_iou_table, level_summaries
from .hierarchies import model_hierarchy
from .loss import LossTerms, PixelPrototypeCELoss
from .model import build_model

LOSS_TERMS = LossTerms._fields
RUN_FILES = ("last.pt", "log.jsonl", "metrics.json")  # what a run writes under train.output_dir


class JsonLog:
    """One JSON object per line (``log.jsonl``), written by the main process only.

    Each record is flushed to disk (fsync) as it is written, so after a crash the log holds
    every record up to it; a torn last line, the only damage a crash can do, is dropped
    when the run resumes."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")
                stream.flush()
                os.fsync(stream.fileno())

    @staticmethod
    def _parse(line: str) -> dict[str, Any] | None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return None
        return record if isinstance(record, dict) else None

    def keep_until(self, iteration: int) -> None:
        """Drop records past ``iteration`` (written after the checkpoint a run resumes from)
        and any torn line; rewrites the file atomically."""
        if not self.enabled or not self.path.exists():
            return
        records = [line for line in self.path.read_text().splitlines()
                   if (record := self._parse(line)) is not None and record.get("iter", 0) <= iteration]
        atomic_write_text(self.path, "".join(line + "\n" for line in records))


def build_optimizer(config, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def poly_schedule(optimizer: torch.optim.Optimizer, iters: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1 - it / iters) ** power)


class Trainer:
    """Builds data, model, loss and optimiser from a :class:`Config`, and trains,
    evaluates, logs and checkpoints (resuming when ``train.resume`` says so)."""

    def __init__(self, config: Config, context: DistributedContext | None = None) -> None:
        self.config = config
        self.context = context or DistributedContext.from_environment(config.train.device)
        self.device = self.context.device
        self.output_dir = Path(config.train.output_dir)
        self._refuse_to_overwrite()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.train.seed * 1_000 + self.context.rank)

        self.data = build_datasets(config.data, seed=config.train.seed)
        self.class_names = self.data.class_names
        self.num_classes = len(self.class_names)
        self.hierarchy = model_hierarchy(config, self.class_names)
        self.model = build_model(config.model, self.num_classes, IGNORE_INDEX, self.context.group,
                                 self.hierarchy).to(self.device)
        if self.context.group is not None and self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # The labels are checked once per step: by the head when it checks them, else by the loss.
        head_checks = getattr(self.model.head, "validate_labels", False)
        self.loss_fn = PixelPrototypeCELoss(config.loss.ppc_weight, config.loss.ppd_weight, IGNORE_INDEX,
                                            config.loss.class_weights, config.loss.contrast_weight,
                                            validate_labels=not head_checks,
                                            process_group=self.context.group).to(self.device)
        self.optimizer = build_optimizer(config.optim, self.model.parameters())
        self.scheduler = poly_schedule(self.optimizer, config.optim.iters, config.optim.poly_power)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.iteration = 0
        self.last_eval: dict[str, Any] | None = None
        self.log = JsonLog(self.output_dir / "log.jsonl", self.context.is_main)
        self._resume()
        self.train_model = self.model
        if self.context.group is not None:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)

    def close(self) -> None:
        """Free the DistributedDataParallel wrapper, then leave the process group.

        Call it once training and evaluation are over. The wrapper's reducer must go
        while the process group and the interpreter are still alive: left to
        interpreter shutdown under gloo, its teardown now and then aborts the rank
        ("terminate called without an active exception", SIGABRT) after a run that
        otherwise succeeded. The trainer sits in reference cycles, so dropping it does
        not free the wrapper at once: hence the collection.
        """
        self.train_model = self.model
        gc.collect()
        self.context.close()

    # ----------------------------------------------------------------- set-up
    def _amp_dtype(self) -> torch.dtype | None:
        if not self.config.train.amp or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _refuse_to_overwrite(self) -> None:
        """A fresh run (no ``train.resume``) into a folder that holds one would truncate its log
        and replace its checkpoint: refused unless ``train.overwrite=true``."""
        train = self.config.train
        if train.resume is not None or train.overwrite:
            return
        found = [name for name in RUN_FILES if (self.output_dir / name).exists()]
        if found:
            raise ConfigError(f"train.output_dir={self.output_dir} already holds a run ({', '.join(found)}); "
                              "continue it with train.resume=auto, replace it with train.overwrite=true, "
                              "or choose another folder")

    def _resume_path(self) -> Path | None:
        resume = self.config.train.resume
        if resume is None:
            return None
        if resume == "auto":
            path = self.output_dir / "last.pt"
            return path if path.is_file() else None
        if not Path(resume).is_file():
            raise FileNotFoundError(f"train.resume: checkpoint not found: {resume}")
        return Path(resume)

    def _resume(self) -> None:
        path = self._resume_path()
        if path is None:
            self.log.keep_until(0)
            return
        state = load_checkpoint(path)
        if state["config"]["model"] != self.config.to_dict()["model"]:
            raise ConfigError(f"train.resume: the model config differs from the one saved in {path}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self.last_eval = state.get("last_eval")
        rng = state["rng"]
        if len(rng) == self.context.world_size:  # else: another world size, keep the fresh seeds
            torch.set_rng_state(rng[self.context.rank]["cpu"])
            if self.device.type == "cuda" and rng[self.context.rank]["cuda"] is not None:
                torch.cuda.set_rng_state(rng[self.context.rank]["cuda"], self.device)
        self.log.keep_until(self.iteration)
        self._print(f"resumed from {path} at iteration {self.iteration}")

    # --------------------------------------------------------------- loaders
    def _train_batches(self) -> DataLoader:
        data = self.config.data
        sampler = EpochBatchSampler(len(self.data.train), data.batch_size, seed=self.config.train.seed,
                                    rank=self.context.rank, world_size=self.context.world_size,
                                    start=self.iteration)
        return DataLoader(self.data.train, batch_sampler=sampler, num_workers=data.workers,
                          pin_memory=self.device.type == "cuda", generator=self._loader_generator())

    def _val_batches(self) -> DataLoader:
        # Each rank evaluates every world_size-th image; the confusion matrices are summed.
        indices = range(self.context.rank, len(self.data.val), self.context.world_size)
        return DataLoader(Subset(self.data.val, indices), batch_size=self.config.data.val_batch_size,
                          num_workers=self.config.data.workers, collate_fn=pad_collate,
                          generator=self._loader_generator())

    def _loader_generator(self) -> torch.Generator:
        # A loader draws its workers' base seed from this generator; by default it
        # would draw from the global one, shifting the model's random stream (Gumbel
        # draws) by the number of loaders created, which differs after a resume.
        return torch.Generator().manual_seed(self.config.train.seed)

    # ------------------------------------------------------------------ steps
    def train_step(self, images: Tensor, labels: Tensor) -> LossTerms:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self._autocast():
            output = self.train_model(images, labels)
            terms = self.loss_fn(output, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.loss).backward()
        # A memory-bank head enqueues this batch now: its loss reread the bank in backward.
        update_memory = getattr(self.model.head, "update_memory", None)
        if update_memory is not None:
            update_memory()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        return LossTerms(*(term.detach().float() for term in terms))

    def evaluate(self) -> dict[str, Any]:
        if self.context.group is not None:
            self._broadcast_buffers()
        matrix: ConfusionMatrix = evaluate(self.model, self._val_batches(), self.num_classes, IGNORE_INDEX,
                                           self.device, self.amp_dtype)
        if self.context.group is not None:
            matrix.all_reduce(self.context.group)
        self.last_eval = {"iter": self.iteration, **matrix.summary(self.class_names)}
        levels = {} if self.hierarchy is None else level_summaries(matrix, self.hierarchy)
        if levels:
            self.last_eval["levels"] = levels
        self.log.write({"event": "eval", **self.last_eval})
        tables = [format_iou_table(self.class_names, {"IoU %": self.last_eval})]
        tables += [format_iou_table(list(level["iou"]), {f"{name} IoU %": level}) for name, level in levels.items()]
        self._print(f"\nevaluation at iteration {self.iteration}:\n" + "\n\n".join(tables))
        return self.last_eval

    @torch.no_grad()
    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, which each rank
        updates from its own batch), so all ranks evaluate the model that is saved."""
        for buffer in self.model.buffers():
            torch.distributed.broadcast(buffer, src=0, group=self.context.group)

    def save(self, path: Path | None = None) -> None:
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rng_all = self.context.all_gather_object(rng)
        if not self.context.is_main:
            return
        save_checkpoint(path or self.output_dir / "last.pt", {
            "config": self.config.to_dict(), "class_names": list(self.class_names), "iteration": self.iteration,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_all,
            "last_eval": self.last_eval,
        })

    def _print(self, text: str) -> None:
        if self.context.is_main:
            tqdm.write(text)

    # ------------------------------------------------------------------- loop
    def _due(self, every: int) -> bool:
        return every > 0 and self.iteration % every == 0 and self.iteration < self.config.optim.iters

    def train(self) -> dict[str, Any]:
        """Train to ``optim.iters``, evaluate, save ``last.pt`` and ``metrics.json``."""
        cfg = self.config
        total = cfg.optim.iters
        self.model.train()
        window = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=self.device)  # summed loss terms
        window_steps, window_start = 0, time.perf_counter()
        progress = tqdm(total=total, initial=self.iteration, desc="train", dynamic_ncols=True,
                        disable=not (cfg.train.progress and self.context.is_main))
        batches = iter(self._train_batches()) if self.iteration < total else iter(())
        while self.iteration < total:
            images, labels = next(batches)
            window += torch.stack(self.train_step(images, labels)).double()
            window_steps += 1
            progress.update(1)
            if self.iteration % cfg.train.log_every == 0 or self.iteration == total:
                record = self._log_window(window, window_steps, time.perf_counter() - window_start)
                progress.set_postfix(loss=f"{record['loss']:.3f}")
                window.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if self._due(cfg.train.eval_every):
                self.evaluate()
            if self._due(cfg.train.checkpoint_every):
                self.save()
        progress.close()
        if self.last_eval is None or self.last_eval["iter"] != self.iteration:
            self.evaluate()
        self.save()
        if self.context.is_main:
            atomic_write_text(self.output_dir / "metrics.json", json.dumps(self.last_eval, indent=2) + "\n")
        return self.last_eval

    def _log_window(self, window: Tensor, steps: int, seconds: float) -> dict[str, Any]:
        means = self.context.mean(window / steps).tolist()
        record = {"event": "train", "iter": self.iteration, "lr": self.scheduler.get_last_lr()[0],
                  **dict(zip(LOSS_TERMS, means)),
                  "seconds_per_iter": seconds / steps}
        if not all(math.isfinite(record[name]) for name in LOSS_TERMS):
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {record}")
        self.log.write(record)
        return record
