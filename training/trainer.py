"""One training run as an object: ``Trainer(opts, dist).run()``.

``__init__`` sets the run up, top to bottom: tokenizer and model config (``plan.py``), data,
model, optimizer and schedule, then the state of an interrupted run when resuming. ``run`` is the
epoch loop; ``train_step``, ``validate`` and ``save`` are what it does each step, each validation
and each checkpoint.

Setup runs in a fixed order: the model's initialisation draws from the RNG seeded first, and a
resumed run restores the saved RNG states only once everything is built. Reordering setup changes
what a given seed trains.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, Dataset
from tqdm import tqdm

from v2t_engine.errors import ArtifactError
from v2t_engine.inputs.frames import FrameSource
from v2t_engine.inputs.tables import InputSchema
from v2t_engine.tokenizer import CaptionTokenizer

from v2t_training import checkpoint as ckpt
from v2t_training.augment import augment_batch
from v2t_training.clip_weights import load_clip_vision
from v2t_training.data import CaptionDataset, DataSpec, ResumableSampler, make_loader, read_captions
from v2t_training.distributed import Dist, broadcast_tokenizer
from v2t_training.model import VideoCaptioner, count_parameters
from v2t_training.optim import MuonAdamW, lr_lambda, param_groups
from v2t_training.options import TrainOptions
from v2t_training.plan import ModelPlan, check_sequence_length, plan_model

log = logging.getLogger(__name__)


class Trainer:
    """EasyNLP's video2text recipe on one process of a (possibly distributed) run."""

    def __init__(self, opts: TrainOptions, d: Dist):
        self.opts, self.d = opts, d
        self.out = Path(opts.checkpoint_dir)
        torch.set_num_threads(opts.threads or d.cores_per_rank)
        _seed_everything(opts.random_seed)
        schema = InputSchema.parse(opts.input_schema)
        if opts.resume and not ckpt.is_resumable(self.out):
            raise ArtifactError(f"--resume: {self.out} holds no {ckpt.TRAINING_STATE_FILE} to resume from")
        plan = plan_model(opts.user_defined_parameters, lambda: self._new_tokenizer(schema),
                          self.out if opts.resume else None)
        check_sequence_length(opts.sequence_length, plan.cfg)
        self.cfg, self.tokenizer = plan.cfg, plan.tokenizer
        self.train_ds, self.val_ds, cached = self._datasets(schema)
        self.model = self._build_model(plan)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.sampler = ResumableSampler(self.train_ds, d.world, d.rank, shuffle=True, seed=opts.random_seed)
        self.loader = make_loader(self.train_ds, opts.micro_batch_size, self.sampler,
                                  opts.resolved_num_workers(cached))
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * opts.epoch_num
        self.optimizer, self.scheduler = self._build_optimizer()
        self.step, self.history = 0, []
        if opts.resume:
            self._restore()
        self.views = opts.resolved_augment_views(self.cfg.freeze_vit)
        self.max_shift = round(opts.augment_shift * self.cfg.img_size)
        self.shift_rng = torch.Generator(device=d.device)  # reseeded each step (train_step)
        self.net = self._distribute(_LossModule(self.model))
        self.train_loss = _RunningMean()  # since the last validation
        self._saved_at = self._validated_at = -1  # so no step is saved or validated twice
        if d.is_main:
            self._log_setup()

    # ------------------------------------------------------------------ setup
    def _new_tokenizer(self, schema: InputSchema) -> CaptionTokenizer:
        """A tokenizer trained on the training captions. Every rank calls this (same inputs); only
        rank 0 trains one, the others receive it."""
        trained = (CaptionTokenizer.train(read_captions(self.opts.train_tables, schema, self.opts.second_sequence))
                   if self.d.is_main else None)
        return trained if self.d.world == 1 else broadcast_tokenizer(trained, self.d)

    def _datasets(self, schema: InputSchema) -> tuple[Dataset, CaptionDataset | None, bool]:
        """(training data, validation data or None, whether all training frames are cached)."""
        opts, cfg, params = self.opts, self.cfg, self.opts.user_defined_parameters
        spec = DataSpec(opts.first_sequence, opts.second_sequence, cfg.frame_num, cfg.img_size, cfg.text_len,
                        FrameSource.from_user_parameters(params))

        def load(path: str) -> CaptionDataset:
            return CaptionDataset(path, schema, spec, self.tokenizer, opts.cache_budget_bytes)

        parts = [load(p) for p in opts.train_tables]
        val = load(opts.validation_table) if opts.validation_table else None
        return (parts[0] if len(parts) == 1 else ConcatDataset(parts)), val, all(p.cached for p in parts)

    def _build_model(self, plan: ModelPlan) -> VideoCaptioner:
        model = VideoCaptioner(self.cfg)
        if plan.vit_ckpt_path is not None:
            load_clip_vision(model.first_stage_model, plan.vit_ckpt_path, self.cfg.n_embd, self.cfg.vit_layers)
        if plan.init_checkpoint is not None:
            ckpt.load_weights_into(model, plan.init_checkpoint)
        if self.opts.resume:
            ckpt.load_weights_into(model, self.out)
        return model.to(self.d.device).train()

    def _build_optimizer(self) -> tuple[MuonAdamW, torch.optim.lr_scheduler.LambdaLR]:
        opts = self.opts
        groups = param_groups(self.model, opts.weight_decay, opts.learning_rate, opts.resolved_encoder_lr_scale,
                              muon=opts.optimizer == "muon")
        optimizer = MuonAdamW(groups, lr=opts.learning_rate, betas=(0.9, 0.95))
        warmup = round(opts.warmup_ratio * self.total_steps)
        schedule = lr_lambda(self.total_steps, warmup, opts.min_lr_ratio)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def _restore(self) -> None:
        """Continue the saved run: optimizer, schedule, step, history and every RNG."""
        state = ckpt.load_training_state(self.out)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = int(state["step"]), list(state.get("history", []))
        ckpt.set_rng_state(state["rng"])
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            log.warning("steps per epoch changed from %s to %d (data, batch size or world size differ); "
                        "resuming at step %d by the new count", state.get("steps_per_epoch"),
                        self.steps_per_epoch, self.step)
        log.info("resuming %s at step %d of %d", self.out, self.step, self.total_steps)

    def _distribute(self, net: nn.Module) -> nn.Module:
        if self.d.world == 1:
            return net
        device = self.d.device
        return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def _log_setup(self) -> None:
        opts = self.opts
        log.info("model: %s parameters (%s trainable), %d train rows, %d steps of %d x %d rows "
                 "(%d view(s) of each, shifted up to %d px), %s",
                 f"{count_parameters(self.model):,}", f"{sum(p.numel() for p in self.trainable):,}",
                 len(self.train_ds), self.total_steps, opts.micro_batch_size, self.d.world, self.views,
                 self.max_shift, opts.optimizer)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        """Train to the last epoch (from the saved step when resuming); returns the checkpoint
        directory."""
        progress = _Progress(self.total_steps, self.step, self.opts.micro_batch_size * self.d.world,
                             enabled=self.d.is_main and self.opts.progress)
        try:
            with _deterministic_on_cpu(self.d.device):
                for epoch in range(self.step // self.steps_per_epoch, self.opts.epoch_num):
                    self.run_epoch(epoch, progress)
        finally:
            progress.close()
        return self.out

    def run_epoch(self, epoch: int, progress: _Progress) -> None:
        opts = self.opts
        done = self.step - epoch * self.steps_per_epoch  # steps of this epoch before a resume
        self.sampler.set_epoch(epoch)  # the same shuffle as an uninterrupted run ...
        self.sampler.set_start(done * opts.micro_batch_size)  # ... minus the rows already trained on
        progress.restart_clock()
        for frames, tokens in self.loader:
            loss = self.train_step(frames, tokens)
            self.train_loss.add(loss)
            progress.update(loss)
            if self.d.is_main and self.step % opts.logging_steps == 0:
                log.info("step %d/%d epoch %d: loss %.4f lr %.2e %.0f samples/s", self.step, self.total_steps,
                         epoch, progress.loss, self.scheduler.get_last_lr()[0], progress.rate)
            if opts.save_checkpoint_steps and self.step % opts.save_checkpoint_steps == 0:
                self.validate(epoch)
                # A save on an epoch's last step records the next epoch, which a resumed run starts at.
                self.save(epoch + (self.step % self.steps_per_epoch == 0))
        self.validate(epoch)
        if not opts.save_checkpoint_steps or epoch == opts.epoch_num - 1:
            self.save(epoch + 1)

    def train_step(self, frames: torch.Tensor, tokens: torch.Tensor) -> float:
        """One optimizer step on a batch, each clip seen in ``views`` shifted views; returns the loss."""
        d = self.d
        # The shifts of step s come from a generator seeded by (seed, rank, s), not from the global
        # RNG that DataLoader iterators also draw from: a resumed run repeats them exactly.
        self.shift_rng.manual_seed(((self.opts.random_seed * 1_000_003 + d.rank) * 1_000_003 + self.step) % 2**63)
        frames, tokens = augment_batch(frames.to(d.device, non_blocking=True), tokens.to(d.device, non_blocking=True),
                                       self.views, self.max_shift, self.shift_rng)
        loss = self.net(frames, tokens)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.trainable, self.opts.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item()

    def validate(self, epoch: int) -> None:
        """Append the validation loss, and the training loss since the last validation, to the
        history: the two together tell underfitting from overfitting."""
        if self.val_ds is None or self._validated_at == self.step:
            return
        self._validated_at = self.step
        val_loss = evaluate(self.model, self.val_ds, self.opts.micro_batch_size, self.d)
        entry = {"step": self.step, "epoch": epoch, "val_loss": round(val_loss, 6)}
        train_loss = self.train_loss.take()
        if train_loss is not None:
            entry["train_loss"] = round(train_loss, 6)
        self.history.append(entry)
        if self.d.is_main:
            log.info("step %d epoch %d: validation loss %.4f (training loss %s)", self.step, epoch, val_loss,
                     f"{entry['train_loss']:.4f}" if "train_loss" in entry else "n/a")

    def save(self, epoch: int) -> None:
        """Write the checkpoint (rank 0) that ``--resume`` continues from; every rank waits for it."""
        if self._saved_at == self.step:
            return
        self._saved_at = self.step
        if self.d.is_main:
            training_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                              "step": self.step, "epoch": epoch, "steps_per_epoch": self.steps_per_epoch,
                              "history": self.history, "rng": ckpt.rng_state(), "options": self.opts.as_plain_dict()}
            trainer_state = {"step": self.step, "epoch": epoch, "total_steps": self.total_steps,
                             "history": self.history}
            ckpt.save_checkpoint(self.out, self.model, self.tokenizer, training_state, trainer_state)
        if self.d.world > 1:
            dist.barrier()  # nobody reads or overwrites a checkpoint still being written


class _LossModule(nn.Module):
    """DistributedDataParallel hooks only ``forward``; route the training loss through it."""

    def __init__(self, model: VideoCaptioner):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.loss(frames, tokens)


@torch.no_grad()
def evaluate(model: VideoCaptioner, dataset: CaptionDataset, batch_size: int, d: Dist) -> float:
    """Mean validation loss over every row, each rank taking rows rank, rank+world, ..."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=d.device)  # (loss sum, rows)
    for frames, tokens in make_loader(dataset, batch_size, sampler=range(d.rank, len(dataset), d.world)):
        loss = model.loss(frames.to(d.device), tokens.to(d.device))
        total += torch.tensor([loss.item() * len(tokens), len(tokens)], dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


@contextlib.contextmanager
def _deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """PyTorch's deterministic kernels while training on the CPU, so a seed trains the same weights
    bit for bit on any number of threads. Without them, some backward kernels sum in thread order:
    two runs of 2 epochs differed by 1e-8 on 2 threads, which 20 epochs grew into captions that
    differ. They cost no measurable speed on the CPU here. Not on GPUs, where they do and cuBLAS
    needs CUBLAS_WORKSPACE_CONFIG. The setting is the process's: restored afterwards."""
    if device.type != "cpu":
        yield
        return
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _RunningMean:
    """The mean of the values added since it was last taken."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    def take(self) -> float | None:
        """The mean (None when nothing was added), and start over."""
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean


class _Progress:
    """The tqdm bar, with the smoothed loss and throughput it shows and the log reports."""

    def __init__(self, total_steps: int, step: int, samples_per_step: int, enabled: bool):
        self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not enabled)
        self.samples_per_step = samples_per_step
        self.loss: float | None = None
        self.rate: float | None = None  # samples a second, all ranks together
        self._tick = time.perf_counter()

    def restart_clock(self) -> None:
        """At an epoch's start: the time the loader takes to start is not a step's."""
        self._tick = time.perf_counter()

    def update(self, loss: float) -> None:
        now = time.perf_counter()
        self.rate = _smooth(self.rate, self.samples_per_step / (now - self._tick))
        self._tick = now
        self.loss = _smooth(self.loss, loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.loss:.4f}", samples_s=f"{self.rate:.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _smooth(average: float | None, value: float) -> float:
    """Exponential moving average, starting at the first value."""
    return value if average is None else 0.9 * average + 0.1 * value
