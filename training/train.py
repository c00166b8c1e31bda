"""The training loop: EasyNLP's video2text recipe (EASYNLP.md §1, §6) on CPU or CUDA, one process
or several under ``torchrun``.

``train(TrainOptions(...))`` reads the tables (train first, validation last), resolves the model
from ``--user_defined_parameters`` (from scratch, from a HF CLIP ViT, or finetuning a v2t
checkpoint), trains with Muon + AdamW (``optim.py``) on shifted views of each clip
(``augment.py``), linear warm-up + cosine decay, evaluates the validation loss, and writes
checkpoints (``checkpoint.py``) that ``--resume`` continues exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset
from tqdm import tqdm

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ArtifactError, ConfigError
from v2t_engine.inputs.frames import FrameSource
from v2t_engine.params import get_bool, get_int
from v2t_engine.inputs.tables import InputSchema
from v2t_engine.tokenizer import CaptionTokenizer

from v2t_training import checkpoint as ckpt
from v2t_training.augment import augment_batch
from v2t_training.clip_weights import load_clip_vision, read_clip_vision_spec
from v2t_training.data import DEFAULT_CACHE_BUDGET, CaptionDataset, DataSpec, ResumableSampler, make_loader, read_captions
from v2t_training.model import VideoCaptioner, count_parameters
from v2t_training.optim import MuonAdamW

log = logging.getLogger(__name__)

TRAIN_PARAMS = ("frame_num", "img_size", "img_len", "text_len", "block_size", "n_layer", "n_head", "n_embd",
                "vit_ckpt_path", "vit_width", "vit_layers", "vit_heads", "vit_patch_size", "freeze_vit",
                "pretrain_model_name_or_path", "enable_img_path", "img_root_dir")
# Keys that fix the architecture: they come from the checkpoint when finetuning or resuming.
# frame_num is not among them: positions come from block_size, so it may change when finetuning.
OPTIMIZERS = ("muon", "adamw")
ARCH_KEYS = ("img_size", "text_len", "n_layer", "n_head", "n_embd", "vit_width", "vit_layers",
             "vit_heads", "vit_patch_size")


@dataclass(frozen=True)
class TrainOptions:
    """Everything one training run needs; the CLI fills it from EasyNLP's flags."""

    tables: tuple[str, ...]  # train table(s) first, validation table last
    checkpoint_dir: str
    input_schema: str = "idx:str:1,imgbase64:str:1,text:str:1"
    first_sequence: str = "imgbase64"  # frames column
    second_sequence: str = "text"  # caption column
    user_defined_parameters: Mapping[str, str] = field(default_factory=dict)
    learning_rate: float = 5e-5
    epoch_num: int = 3
    micro_batch_size: int = 8  # per process
    random_seed: int = 1234
    logging_steps: int = 100
    save_checkpoint_steps: int | None = None  # None: save at each epoch end
    weight_decay: float = 0.01
    warmup_ratio: float = 0.15  # share of all steps spent ramping the LR up linearly
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of the peak LR
    grad_clip: float = 1.0
    # "muon": Muon for hidden weight matrices, AdamW for the rest (optim.py); "adamw": AdamW only.
    optimizer: str = "muon"
    # The frame encoder's learning rate relative to --learning_rate; None: 1.0 under Muon, 0.3
    # under AdamW (a ViT trained from scratch by AdamW at the decoder's rate was unstable: 36%
    # exact on the recipe against 61% at 0.3). Measured values: README, "Training defaults".
    encoder_lr_scale: float | None = None
    # Augmentation (augment.py): views of each clip per step, and the largest shift as a share
    # of img_size. None views: 3 while the frame encoder trains, 1 when it is frozen (the views
    # are there to teach the encoder; a frozen one only costs time).
    augment_views: int | None = None
    augment_shift: float = 1 / 16
    resume: bool = False
    num_workers: int | None = None  # None: 0 when frames are cached in memory, else a few
    threads: int | None = None  # torch intra-op threads; None: the cores divided among local ranks
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET
    sequence_length: int | None = None  # EasyNLP's --sequence_length, checked against block_size
    device: str | None = None  # None: cuda when available
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [(bool(self.tables), "--tables names no table"),
                  (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
                  (self.epoch_num >= 1, f"epoch_num must be at least 1, got {self.epoch_num}"),
                  (self.micro_batch_size >= 1, f"micro_batch_size must be at least 1, got {self.micro_batch_size}"),
                  (self.logging_steps >= 1, f"logging_steps must be at least 1, got {self.logging_steps}"),
                  (self.save_checkpoint_steps is None or self.save_checkpoint_steps >= 1,
                   f"save_checkpoint_steps must be at least 1, got {self.save_checkpoint_steps}"),
                  (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
                  (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
                  (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                                                 f"got {self.optimizer!r}"),
                  (self.encoder_lr_scale is None or self.encoder_lr_scale > 0,
                   f"encoder_lr_scale must be positive, got {self.encoder_lr_scale}"),
                  (self.augment_views is None or self.augment_views >= 1,
                   f"augment_views must be at least 1, got {self.augment_views}"),
                  (0 <= self.augment_shift < 0.5, f"augment_shift must be in [0, 0.5), got {self.augment_shift}")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        unknown = sorted(set(self.user_defined_parameters) - set(TRAIN_PARAMS))
        if unknown:
            raise ConfigError(f"user_defined_parameters: unknown key(s) {', '.join(unknown)}; "
                              f"known keys: {', '.join(TRAIN_PARAMS)}")

    @property
    def resolved_encoder_lr_scale(self) -> float:
        if self.encoder_lr_scale is not None:
            return self.encoder_lr_scale
        return 1.0 if self.optimizer == "muon" else 0.3


# ---------------------------------------------------------------------------- distributed setup
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str | None) -> Dist:
    """Read torchrun's environment; join the process group when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, local_world, dev)


def _set_threads(opts: TrainOptions, d: Dist) -> None:
    # Ranks on one machine share its cores; oversubscription makes every rank slower.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(opts.threads or max(1, cores // d.local_world))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- model resolution
@dataclass(frozen=True)
class ModelPlan:
    cfg: ModelConfig
    tokenizer: CaptionTokenizer
    init_checkpoint: Path | None  # v2t checkpoint whose weights start the run
    vit_ckpt_path: Path | None  # HF CLIP directory loaded into the frame encoder


def plan_model(params: Mapping[str, str], new_tokenizer: Callable[[], CaptionTokenizer],
               from_checkpoint: Path | None = None) -> ModelPlan:
    """Resolve the ModelConfig and tokenizer from user parameters (EasyNLP's keys).

    ``from_checkpoint`` (resume) or ``pretrain_model_name_or_path`` naming a v2t checkpoint: the
    architecture and tokenizer come from it and conflicting user keys are errors. A
    ``pretrain_model_name_or_path`` holding only a BERT vocabulary gives the tokenizer; without
    one, ``new_tokenizer()`` gives it (trained on the training captions).
    """
    pretrain = params.get("pretrain_model_name_or_path")
    vit_path = Path(params["vit_ckpt_path"]) if params.get("vit_ckpt_path") else None
    source = from_checkpoint or (Path(pretrain) if pretrain and ckpt.is_checkpoint(pretrain) else None)
    user = {k: get_int(params, k) for k in (*ARCH_KEYS, "frame_num") if k in params}
    freeze = get_bool(params, "freeze_vit")

    if source is not None:
        if vit_path is not None:
            raise ConfigError(f"vit_ckpt_path and a v2t checkpoint ({source}) both give the frame encoder's "
                              "weights; leave vit_ckpt_path out when finetuning or resuming")
        cfg = ModelConfig.load(source)
        tokenizer = CaptionTokenizer.from_dir(source)
        _check_same(user, cfg, source)
        changes: dict[str, Any] = {"frame_num": user.get("frame_num", cfg.frame_num)}
        if from_checkpoint is None:  # finetuning: the loaded ViT stays frozen unless asked
            changes["freeze_vit"] = True if freeze is None else freeze
        elif freeze is not None and freeze != cfg.freeze_vit:
            raise ConfigError(f"freeze_vit={freeze} but the run being resumed used freeze_vit={cfg.freeze_vit}")
        cfg = cfg.replace(**changes)
    else:
        if pretrain:
            if not Path(pretrain).exists():
                raise ConfigError(f"pretrain_model_name_or_path {pretrain!r} is not a local directory; v2t never "
                                  "downloads: pass a v2t checkpoint or a directory with a BERT vocab.txt/tokenizer.json")
            tokenizer = CaptionTokenizer.from_dir(pretrain)
        else:
            tokenizer = new_tokenizer()
        fields: dict[str, Any] = {k: v for k, v in user.items()}
        if vit_path is not None:
            spec = read_clip_vision_spec(vit_path)
            for k, v in spec.config_fields().items():
                if k in user and user[k] != v:
                    raise ConfigError(f"{k}={user[k]} conflicts with the CLIP checkpoint {vit_path} ({k}={v})")
                fields[k] = v
        fields["freeze_vit"] = (vit_path is not None) if freeze is None else freeze
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, **fields)
    if (tokenizer.vocab_size, tokenizer.pad_id) != (cfg.vocab_size, cfg.pad_id):
        raise ArtifactError(f"the tokenizer (vocab {tokenizer.vocab_size}) does not match the model "
                            f"(vocab {cfg.vocab_size})")
    _check_derived(params, cfg)
    return ModelPlan(cfg, tokenizer, source if from_checkpoint is None else None, vit_path)


def _check_same(user: Mapping[str, int], cfg: ModelConfig, source: Path) -> None:
    for key in ARCH_KEYS:
        if key in user and user[key] != getattr(cfg, key):
            raise ConfigError(f"{key}={user[key]} but the checkpoint {source} was built with "
                              f"{key}={getattr(cfg, key)}; leave architecture keys out or match them")


def _check_derived(params: Mapping[str, str], cfg: ModelConfig) -> None:
    """EasyNLP's img_len and block_size are derived values here; accept them when consistent."""
    img_len, block = get_int(params, "img_len"), get_int(params, "block_size")
    if img_len is not None and img_len != cfg.img_len:
        raise ConfigError(f"img_len={img_len} but img_size={cfg.img_size} with vit_patch_size={cfg.vit_patch_size} "
                          f"gives ({cfg.img_size}/{cfg.vit_patch_size})^2 = {cfg.img_len} patches per frame")
    if block is not None and block != cfg.block_size:
        raise ConfigError(f"block_size={block} but img_len + text_len = {cfg.img_len} + {cfg.text_len} "
                          f"= {cfg.block_size}")


def _broadcast_tokenizer(tokenizer: CaptionTokenizer | None, d: Dist) -> CaptionTokenizer:
    """Rank 0's tokenizer on every rank (WordPiece training need not give identical ids twice)."""
    payload: list[Any] = [None]
    if d.is_main:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            payload[0] = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    dist.broadcast_object_list(payload, src=0)
    if d.is_main:
        return tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in payload[0].items():
            (Path(tmp) / name).write_bytes(data)
        return CaptionTokenizer.from_dir(tmp)


# ---------------------------------------------------------------------------- optimisation
# Trainable tensors that are tables looked up or read row by row, not maps between hidden
# spaces: they keep AdamW under Muon (optim.py).
_TABLES = ("transformer.tok_emb.weight", "transformer.pos_emb", "transformer.head.weight",
           "first_stage_model.class_embedding", "first_stage_model.positional_embedding")


def param_groups(model: nn.Module, weight_decay: float, lr: float, encoder_lr_scale: float = 1.0,
                 muon: bool = False) -> list[dict[str, Any]]:
    """Parameter groups for ``MuonAdamW``.

    minGPT's decay rule: decay the weight matrices of Linear/Conv layers (and the ViT's fused
    in_proj and proj matrices), never biases, LayerNorms, embeddings or position tables. With
    ``muon`` those matrices are updated by Muon (the fused q/k/v in_proj as three blocks), the
    rest by AdamW; without it everything is AdamW. The frame encoder (``first_stage_model``)
    learns at ``encoder_lr_scale`` times ``lr``."""
    matrices = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            matrices.add(prefix + "weight")
        for pname in ("in_proj_weight", "proj"):
            if isinstance(getattr(module, pname, None), nn.Parameter):
                matrices.add(prefix + pname)
    matrices -= set(_TABLES)  # the output head is a Linear but a table of token vectors
    groups: dict[tuple[bool, int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = name in matrices or name == "transformer.head.weight"
            blocks = (3 if name.endswith("in_proj_weight") else 1) if muon and name in matrices else 0
            groups.setdefault((decay, blocks, name.startswith("first_stage_model.")), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "muon": blocks > 0,
             "blocks": max(1, blocks), "lr": lr * (encoder_lr_scale if encoder else 1.0)}
            for (decay, blocks, encoder), params in sorted(groups.items())]


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to ``min_ratio`` of it at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


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


# ---------------------------------------------------------------------------- the run
def train(opts: TrainOptions) -> Path:
    """Train per ``opts``; returns the checkpoint directory. Under torchrun every rank calls it."""
    d = _setup_distributed(opts.device)
    try:
        return _train(opts, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(opts: TrainOptions, d: Dist) -> Path:
    _set_threads(opts, d)
    _seed_everything(opts.random_seed)
    out = Path(opts.checkpoint_dir)
    schema = InputSchema.parse(opts.input_schema)
    train_paths = list(opts.tables[:-1]) if len(opts.tables) > 1 else list(opts.tables)
    val_path = opts.tables[-1] if len(opts.tables) > 1 else None
    params = dict(opts.user_defined_parameters)

    if opts.resume and not (out / ckpt.TRAINING_STATE_FILE).is_file():
        raise ArtifactError(f"--resume: {out} holds no {ckpt.TRAINING_STATE_FILE} to resume from")

    def new_tokenizer() -> CaptionTokenizer:
        if d.world == 1:
            return CaptionTokenizer.train(read_captions(train_paths, schema, opts.second_sequence))
        # Every rank takes this branch (same inputs); only rank 0 trains, the others receive it.
        tok = CaptionTokenizer.train(read_captions(train_paths, schema, opts.second_sequence)) if d.is_main else None
        return _broadcast_tokenizer(tok, d)

    plan = plan_model(params, new_tokenizer, out if opts.resume else None)
    cfg, tokenizer = plan.cfg, plan.tokenizer
    if opts.sequence_length is not None and opts.sequence_length != cfg.block_size:
        raise ConfigError(f"sequence_length={opts.sequence_length} but the model's block_size "
                          f"(img_len + text_len) is {cfg.block_size}")

    spec = DataSpec(opts.first_sequence, opts.second_sequence, cfg.frame_num, cfg.img_size, cfg.text_len,
                    FrameSource(enable_img_path=get_bool(params, "enable_img_path", False),
                                img_root_dir=params.get("img_root_dir")))
    parts = [CaptionDataset(p, schema, spec, tokenizer, opts.cache_budget_bytes) for p in train_paths]
    train_ds = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    val_ds = CaptionDataset(val_path, schema, spec, tokenizer, opts.cache_budget_bytes) if val_path else None

    model = VideoCaptioner(cfg)
    if plan.vit_ckpt_path is not None:
        load_clip_vision(model.first_stage_model, plan.vit_ckpt_path, cfg.n_embd, cfg.vit_layers)
    if plan.init_checkpoint is not None:
        ckpt.load_weights_into(model, plan.init_checkpoint)
    if opts.resume:
        ckpt.load_weights_into(model, out)
    model.to(d.device).train()

    sampler = ResumableSampler(train_ds, d.world, d.rank, shuffle=True, seed=opts.random_seed)
    cached = all(p.cached for p in parts)
    workers = opts.num_workers if opts.num_workers is not None else (0 if cached else 2)
    loader = make_loader(train_ds, opts.micro_batch_size, sampler, workers)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * opts.epoch_num
    groups = param_groups(model, opts.weight_decay, opts.learning_rate, opts.resolved_encoder_lr_scale,
                          muon=opts.optimizer == "muon")
    optimizer = MuonAdamW(groups, lr=opts.learning_rate, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, round(opts.warmup_ratio * total_steps), opts.min_lr_ratio))
    step, history = 0, []
    if opts.resume:
        state = ckpt.load_training_state(out)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state.get("history", []))
        ckpt.set_rng_state(state["rng"])
        if state.get("steps_per_epoch") != steps_per_epoch:
            log.warning("steps per epoch changed from %s to %d (data, batch size or world size differ); "
                        "resuming at step %d by the new count", state.get("steps_per_epoch"), steps_per_epoch, step)
        log.info("resuming %s at step %d of %d", out, step, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    views = opts.augment_views or (1 if cfg.freeze_vit else 3)
    max_shift = round(opts.augment_shift * cfg.img_size)
    # The shifts of step s come from a generator seeded by (seed, rank, s), not from the global
    # RNG that DataLoader iterators also draw from: a resumed run repeats them exactly.
    shift_rng = torch.Generator(device=d.device)
    net: nn.Module = _LossModule(model)
    if d.world > 1:
        net = DistributedDataParallel(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if d.is_main:
        log.info("model: %s parameters (%s trainable), %d train rows, %d steps of %d x %d rows "
                 "(%d view(s) of each, shifted up to %d px), %s",
                 f"{count_parameters(model):,}", f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}",
                 len(train_ds), total_steps, opts.micro_batch_size, d.world, views, max_shift, opts.optimizer)

    done = {"saved": -1, "validated": -1}  # last step saved / validated, so none is done twice

    def save(epoch: int) -> None:
        if done["saved"] == step:
            return
        done["saved"] = step
        if d.is_main:
            training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                              "step": step, "epoch": epoch, "steps_per_epoch": steps_per_epoch,
                              "history": history, "rng": ckpt.rng_state(), "options": _options_dict(opts)}
            trainer_state = {"step": step, "epoch": epoch, "total_steps": total_steps, "history": history}
            ckpt.save_checkpoint(out, model, tokenizer, training_state, trainer_state)
        if d.world > 1:
            dist.barrier()  # nobody reads or overwrites a checkpoint still being written

    # Training loss since the last validation (this rank's batches), recorded beside the
    # validation loss: the two together tell underfitting from overfitting.
    since = {"loss": 0.0, "steps": 0}

    def validate(epoch: int) -> None:
        if val_ds is None or done["validated"] == step:
            return
        done["validated"] = step
        val_loss = evaluate(model, val_ds, opts.micro_batch_size, d)
        entry = {"step": step, "epoch": epoch, "val_loss": round(val_loss, 6)}
        if since["steps"]:
            entry["train_loss"] = round(since["loss"] / since["steps"], 6)
        since.update(loss=0.0, steps=0)
        history.append(entry)
        if d.is_main:
            log.info("step %d epoch %d: validation loss %.4f (training loss %s)", step, epoch, val_loss,
                     f"{entry['train_loss']:.4f}" if "train_loss" in entry else "n/a")

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (d.is_main and opts.progress))
    samples_per_step = opts.micro_batch_size * d.world
    smooth_loss, rate = None, 0.0
    for epoch in range(step // steps_per_epoch, opts.epoch_num):
        sampler.set_epoch(epoch)  # the same shuffle as an uninterrupted run ...
        sampler.set_start((step - epoch * steps_per_epoch) * opts.micro_batch_size)  # ... minus rows done
        tick = time.perf_counter()
        for frames, tokens in loader:
            shift_rng.manual_seed(((opts.random_seed * 1_000_003 + d.rank) * 1_000_003 + step) % 2**63)
            frames, tokens = augment_batch(frames.to(d.device, non_blocking=True),
                                           tokens.to(d.device, non_blocking=True), views, max_shift, shift_rng)
            loss = net(frames, tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, opts.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            now = time.perf_counter()
            current = samples_per_step / (now - tick)
            rate, tick = (0.9 * rate + 0.1 * current if rate else current), now
            value = loss.item()
            since["loss"] += value
            since["steps"] += 1
            smooth_loss = value if smooth_loss is None else 0.9 * smooth_loss + 0.1 * value
            bar.update(1)
            bar.set_postfix(loss=f"{smooth_loss:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            if d.is_main and step % opts.logging_steps == 0:
                log.info("step %d/%d epoch %d: loss %.4f lr %.2e %.0f samples/s", step, total_steps, epoch,
                         smooth_loss, scheduler.get_last_lr()[0], rate)
            if opts.save_checkpoint_steps and step % opts.save_checkpoint_steps == 0:
                validate(epoch)
                save(epoch + (step % steps_per_epoch == 0))
        validate(epoch)
        if not opts.save_checkpoint_steps or epoch == opts.epoch_num - 1:
            save(epoch + 1)
    bar.close()
    return out


def _options_dict(opts: TrainOptions) -> dict[str, Any]:
    """The options as plain types (what torch.load(weights_only=True) reads back)."""
    data = dataclasses.asdict(opts)
    data["tables"] = list(data["tables"])
    data["user_defined_parameters"] = dict(data["user_defined_parameters"])
    return data
