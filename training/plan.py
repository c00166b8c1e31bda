"""The model a run trains, resolved from ``--user_defined_parameters`` (EasyNLP's keys): its
``ModelConfig``, its tokenizer and the weights it starts from.

Three starts: from scratch (architecture keys, tokenizer trained on the training captions or read
from a BERT vocabulary directory), from a Hugging Face CLIP ViT (``vit_ckpt_path`` fixes the frame
encoder's shape), or from a checkpoint (finetuning with ``pretrain_model_name_or_path`` naming a v2t or an EasyNLP
checkpoint, or ``--resume``), which fixes the architecture and the tokenizer.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ArtifactError, ConfigError
from v2t_engine.params import get_bool, get_int
from v2t_engine.tokenizer import CaptionTokenizer

from v2t_training.checkpoint import is_checkpoint, read_checkpoint
from v2t_training.clip_weights import read_clip_vision_spec

# Keys that fix the architecture: they come from the checkpoint when finetuning or resuming.
# frame_num is not among them: positions come from block_size, so it may change when finetuning.
ARCH_KEYS = ("img_size", "text_len", "n_layer", "n_head", "n_embd", "vit_width", "vit_layers",
             "vit_heads", "vit_patch_size")


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
    source = from_checkpoint or (Path(pretrain) if pretrain and is_checkpoint(pretrain) else None)
    user = {k: get_int(params, k) for k in (*ARCH_KEYS, "frame_num") if k in params}
    freeze = get_bool(params, "freeze_vit")
    if source is not None:
        if vit_path is not None:
            raise ConfigError(f"vit_ckpt_path and a v2t checkpoint ({source}) both give the frame encoder's "
                              "weights; leave vit_ckpt_path out when finetuning or resuming")
        cfg, tokenizer = _from_checkpoint(source, user, freeze, resuming=from_checkpoint is not None)
    else:
        tokenizer = _tokenizer(pretrain, new_tokenizer)
        cfg = _new_config(tokenizer, user, freeze, vit_path)
    if (tokenizer.vocab_size, tokenizer.pad_id) != (cfg.vocab_size, cfg.pad_id):
        raise ArtifactError(f"the tokenizer (vocab {tokenizer.vocab_size}) does not match the model "
                            f"(vocab {cfg.vocab_size})")
    _check_derived(params, cfg)
    return ModelPlan(cfg, tokenizer, source if from_checkpoint is None else None, vit_path)


def _from_checkpoint(source: Path, user: Mapping[str, int], freeze: bool | None,
                     resuming: bool) -> tuple[ModelConfig, CaptionTokenizer]:
    cfg, tokenizer, _ = read_checkpoint(source, weights=False)
    _check_same(user, cfg, source)
    changes: dict[str, Any] = {"frame_num": user.get("frame_num", cfg.frame_num)}
    if not resuming:  # finetuning: the loaded ViT stays frozen unless asked
        changes["freeze_vit"] = True if freeze is None else freeze
    elif freeze is not None and freeze != cfg.freeze_vit:
        raise ConfigError(f"freeze_vit={freeze} but the run being resumed used freeze_vit={cfg.freeze_vit}")
    return cfg.replace(**changes), tokenizer


def _tokenizer(pretrain: str | None, new_tokenizer: Callable[[], CaptionTokenizer]) -> CaptionTokenizer:
    if not pretrain:
        return new_tokenizer()
    if not Path(pretrain).exists():
        raise ConfigError(f"pretrain_model_name_or_path {pretrain!r} is not a local directory; v2t never "
                          "downloads: pass a v2t checkpoint or a directory with a BERT vocab.txt/tokenizer.json")
    return CaptionTokenizer.from_dir(pretrain)


def _new_config(tokenizer: CaptionTokenizer, user: Mapping[str, int], freeze: bool | None,
                vit_path: Path | None) -> ModelConfig:
    """A model built here: the user's keys, the CLIP checkpoint's shape where one is given."""
    fields: dict[str, Any] = dict(user)
    if vit_path is not None:
        for k, v in read_clip_vision_spec(vit_path).config_fields().items():
            if k in user and user[k] != v:
                raise ConfigError(f"{k}={user[k]} conflicts with the CLIP checkpoint {vit_path} ({k}={v})")
            fields[k] = v
    fields["freeze_vit"] = (vit_path is not None) if freeze is None else freeze
    return ModelConfig(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, **fields)


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


def check_sequence_length(sequence_length: int | None, cfg: ModelConfig) -> None:
    """EasyNLP's --sequence_length is the block size, derived here: accept it when consistent."""
    if sequence_length is not None and sequence_length != cfg.block_size:
        raise ConfigError(f"sequence_length={sequence_length} but the model's block_size "
                          f"(img_len + text_len) is {cfg.block_size}")
