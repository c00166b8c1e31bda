"""The model configuration: one frozen dataclass, stored as ``config.json`` in checkpoints and
copied into export manifests. Torch-free so the runtime can read it."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_FILE = "config.json"
MODEL_TYPE = "v2t_video_captioner"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the CLIP-ViT frame encoder + minGPT caption decoder (EASYNLP.md §4).

    The sequence the decoder sees is ``[frame_1 .. frame_F, text tokens]``; positions start at 0
    on the first frame. ``block_size`` (rows of the learned position table) is EasyNLP's
    ``img_len + text_len`` even though only ``frame_num + text_len`` positions are used, so
    EasyNLP checkpoints load weight for weight.
    """

    vocab_size: int
    pad_id: int = 0
    frame_num: int = 3
    img_size: int = 224
    text_len: int = 32
    # Decoder (minGPT).
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # Frame encoder (OpenAI CLIP VisionTransformer).
    vit_width: int = 1024
    vit_layers: int = 24
    vit_heads: int = 16
    vit_patch_size: int = 14
    vit_act: str = "quick_gelu"  # OpenAI CLIP; some HF CLIP checkpoints use "gelu"
    vit_layer_norm_eps: float = 1e-5
    freeze_vit: bool = False

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "frame_num", "img_size", "text_len", "n_layer", "n_head",
                     "n_embd", "vit_width", "vit_layers", "vit_heads", "vit_patch_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(0 <= self.pad_id < self.vocab_size, f"pad_id {self.pad_id} is outside the vocabulary (size {self.vocab_size})")
        need(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        need(self.vit_width % self.vit_heads == 0,
             f"vit_width ({self.vit_width}) must be divisible by vit_heads ({self.vit_heads})")
        need(self.img_size % self.vit_patch_size == 0,
             f"img_size ({self.img_size}) must be a multiple of vit_patch_size ({self.vit_patch_size})")
        need(self.frame_num <= self.img_len,
             f"frame_num ({self.frame_num}) may be at most img_len ({self.img_len}) as in EasyNLP")
        need(self.vit_act in ("quick_gelu", "gelu"), f"vit_act must be quick_gelu or gelu, got {self.vit_act!r}")

    @property
    def img_len(self) -> int:
        """Patches per frame, (img_size / patch)^2: EasyNLP's ``img_len``."""
        return (self.img_size // self.vit_patch_size) ** 2

    @property
    def block_size(self) -> int:
        return self.img_len + self.text_len

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def vit_has_proj(self) -> bool:
        """EasyNLP drops CLIP's projection when the ViT width already equals n_embd."""
        return self.vit_width != self.n_embd

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory) / CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: not a v2t checkpoint directory") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if data.get("model_type") not in (None, MODEL_TYPE):
            raise ConfigError(f"{path} has model_type {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
        return cls.from_dict(data)
