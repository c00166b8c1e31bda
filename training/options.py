"""What one training run can be told: ``TrainOptions``, and the ``v2t train`` option of each field.

Every default lives here once. A field whose metadata carries ``cli`` (its help text and click
type, see ``_flag``) becomes a ``v2t train`` option with the field's default (``cli.py`` builds
them); the other fields come from the shared table options (``--tables``, ``--input_schema``, ...)
or are for Python callers only. This module does not import torch, so ``v2t train --help`` stays
quick.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from v2t_engine.errors import ConfigError
from v2t_engine.inputs.frames import FrameSource
from v2t_engine.inputs.tables import FRAMES_COLUMN, TEXT_COLUMN

TRAIN_PARAMS = ("frame_num", "img_size", "img_len", "text_len", "block_size", "n_layer", "n_head", "n_embd",
                "vit_ckpt_path", "vit_width", "vit_layers", "vit_heads", "vit_patch_size", "freeze_vit",
                "pretrain_model_name_or_path", *FrameSource.PARAMETERS)
# The frame encoder's learning rate relative to --learning_rate, by optimizer: under AdamW a ViT
# trained from scratch at the decoder's rate was unstable (measured values: README, "Training
# defaults").
ENCODER_LR_SCALE = {"muon": 1.0, "adamw": 0.3}
OPTIMIZERS = tuple(ENCODER_LR_SCALE)
# Shifted views of each clip per step (augment.py). The views are there to teach the frame
# encoder; a frozen one only costs time for them.
VIEWS_ENCODER_TRAINS, VIEWS_ENCODER_FROZEN = 3, 1
LAZY_WORKERS = 2  # DataLoader workers when frames are decoded per batch rather than cached
MIN_LR_RATIO = 0.1  # the cosine decays to this fraction of the peak learning rate
DEFAULT_CACHE_BUDGET = 4 << 30  # bytes of decoded uint8 crops a dataset may keep in memory (data.py)


def _flag(help: str | None = None, type: click.ParamType | None = None, **click_kwargs: Any) -> dict[str, Any]:
    """Field metadata that makes the field a ``v2t train`` option (``cli.py`` adds the default)."""
    return {"cli": {"help": help, "type": type, **click_kwargs}}


@dataclass(frozen=True)
class TrainOptions:
    """Everything one training run needs; the CLI fills it from EasyNLP's flags."""

    tables: tuple[str, ...]  # train table(s) first, validation table last
    checkpoint_dir: str
    input_schema: str = "idx:str:1,imgbase64:str:1,text:str:1"
    first_sequence: str = FRAMES_COLUMN
    second_sequence: str = TEXT_COLUMN  # the captions
    user_defined_parameters: Mapping[str, str] = field(default_factory=dict)
    micro_batch_size: int = 8  # per process
    learning_rate: float = field(default=5e-5, metadata=_flag(
        f"Peak learning rate (linear warm-up, cosine decay to {MIN_LR_RATIO:.0%}).",
        click.FloatRange(0, min_open=True)))
    epoch_num: int = field(default=3, metadata=_flag(type=click.IntRange(min=1)))
    random_seed: int = field(default=1234, metadata=_flag(type=int))
    logging_steps: int = field(default=100, metadata=_flag(type=click.IntRange(min=1)))
    save_checkpoint_steps: int | None = field(default=None, metadata=_flag(
        "Validate and checkpoint every N steps (default: at each epoch end).", click.IntRange(min=1)))
    sequence_length: int | None = field(default=None, metadata=_flag(
        "EasyNLP's block size (img_len + text_len); only checked, the model derives it.", click.IntRange(min=1)))
    weight_decay: float = field(default=0.01, metadata=_flag(type=click.FloatRange(min=0)))
    warmup_ratio: float = field(default=0.15, metadata=_flag(
        "Share of all steps spent warming the learning rate up.", click.FloatRange(0, 1, max_open=True)))
    min_lr_ratio: float = MIN_LR_RATIO
    grad_clip: float = 1.0  # global gradient norm
    optimizer: str = field(default="muon", metadata=_flag(
        "muon: Muon for hidden weight matrices, AdamW for the rest; adamw: AdamW only.", click.Choice(OPTIMIZERS)))
    encoder_lr_scale: float | None = field(default=None, metadata=_flag(
        "The frame encoder's learning rate as a multiple of --learning_rate (default: "
        + ", ".join(f"{scale} with {name}" for name, scale in ENCODER_LR_SCALE.items()) + ").",
        click.FloatRange(min=0, min_open=True)))
    augment_views: int | None = field(default=None, metadata=_flag(
        f"Shifted views of each clip per step (default: {VIEWS_ENCODER_TRAINS} while the frame encoder trains, "
        f"{VIEWS_ENCODER_FROZEN} when it is frozen).", click.IntRange(min=1)))
    augment_shift: float = field(default=1 / 16, metadata=_flag(
        "Largest shift of a view, as a share of img_size (0: none).", click.FloatRange(0, 0.5, max_open=True),
        show_default="1/16"))
    resume: bool = field(default=False, metadata=_flag(
        "Continue the run saved in --checkpoint_dir (optimizer, step, RNG).", is_flag=True))
    num_workers: int | None = field(default=None, metadata=_flag(
        f"DataLoader workers (default: 0 when decoded frames fit in memory, else {LAZY_WORKERS}).",
        click.IntRange(min=0)))
    threads: int | None = field(default=None, metadata=_flag(
        "Torch threads per process (default: the cores shared among local ranks).", click.IntRange(min=1)))
    device: str | None = field(default=None, metadata=_flag(
        "Default: cuda when available.", click.Choice(["cpu", "cuda"])))
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET
    progress: bool = True  # the tqdm bar on rank 0

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
    def train_tables(self) -> tuple[str, ...]:
        """The tables trained on: all but the last, or the only one."""
        return self.tables[:-1] if len(self.tables) > 1 else self.tables

    @property
    def validation_table(self) -> str | None:
        """The last table when there are several; one table alone is trained on, not validated."""
        return self.tables[-1] if len(self.tables) > 1 else None

    @property
    def resolved_encoder_lr_scale(self) -> float:
        return ENCODER_LR_SCALE[self.optimizer] if self.encoder_lr_scale is None else self.encoder_lr_scale

    def resolved_augment_views(self, freeze_vit: bool) -> int:
        if self.augment_views is not None:
            return self.augment_views
        return VIEWS_ENCODER_FROZEN if freeze_vit else VIEWS_ENCODER_TRAINS

    def resolved_num_workers(self, cached: bool) -> int:
        """Cached frames make a batch one index into memory: worker processes would only cost."""
        if self.num_workers is not None:
            return self.num_workers
        return 0 if cached else LAZY_WORKERS

    def as_plain_dict(self) -> dict[str, Any]:
        """The options as plain types (what torch.load(weights_only=True) reads back)."""
        data = dataclasses.asdict(self)
        data["tables"] = list(data["tables"])
        data["user_defined_parameters"] = dict(data["user_defined_parameters"])
        return data
