"""EasyNLP video2text checkpoints, read as EasyNLP writes them (EASYNLP.md §8-9).

A finished EasyNLP run's directory holds ``pytorch_model.bin`` (the application's state dict,
pickled), ``config.json`` (``model_type: mingpt_i2t``: the decoder's sizes), ``vocab.txt`` and
``train_config.json`` (every training argument, the raw ``user_defined_parameters`` among them).
v2t's model uses EasyNLP's parameter names, so the weights map one for one; what needs care:

- the pickle is read with ``weights_only=True`` only: a file that needs code to load is refused;
- the ViT's shape is configured nowhere: it is read off the CLIP weights, as EasyNLP does (width
  and patch from ``conv1``, layers from the resblocks, heads = width / 64, image size from the
  positional table);
- ``frame_num`` is not in ``config.json``: it comes from ``train_config.json`` (EasyNLP's default
  is 3), and ``text_len = block_size - img_len`` with ``img_len = (img_size / patch)^2``, so the
  positions (which start at the first frame) are EasyNLP's exactly.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ArtifactError, ConfigError
from v2t_engine.params import get_int
from v2t_engine.tokenizer import CaptionTokenizer

from v2t_training.openai_clip import vit_shape

MODEL_TYPE = "mingpt_i2t"
WEIGHTS_FILE = "pytorch_model.bin"
CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
DEFAULT_FRAME_NUM = 3  # EasyNLP's, when the run's parameters do not say
# Buffers EasyNLP saves that v2t's model rebuilds: minGPT's causal mask of each block.
_DERIVED = re.compile(r"^transformer\.blocks\.\d+\.attn\.mask$")


def is_easynlp_checkpoint(path: str | Path) -> bool:
    """A directory with pytorch_model.bin and a config.json of model_type mingpt_i2t."""
    return easynlp_model_type(path) == MODEL_TYPE


def easynlp_model_type(path: str | Path) -> str | None:
    """The model_type of an EasyNLP-style directory (pytorch_model.bin + config.json), else None."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        return None
    try:
        return str(json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """pytorch_model.bin as tensors on the CPU, without running any code from the pickle."""
    file = path / WEIGHTS_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"{file} holds objects that need code to load, and v2t reads weights only "
                            f"(torch.load weights_only=True): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise ArtifactError(f"{file} cannot be read (truncated or not a PyTorch file): "
                            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{file} is not a state dict (a mapping of names to tensors)")
    return state


def vit_fields(state: dict[str, torch.Tensor], file: Path) -> dict[str, Any]:
    """The frame encoder's shape, read off its weights as EasyNLP infers it."""
    prefix = "first_stage_model."
    return vit_shape({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, str(file))


def run_parameters(path: Path) -> dict[str, str]:
    """The run's --user_defined_parameters from train_config.json ({} without one)."""
    file = path / TRAIN_CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text(encoding="utf-8")).get("user_defined_parameters") or ""
    except (ValueError, AttributeError) as err:
        raise ArtifactError(f"{file} is not a JSON object: {err}") from None
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    # Every key the run was given: the ones v2t has no use for (vit_ckpt_path, ...) do no harm.
    return dict(t.split("=", 1) for t in str(raw).split() if "=" in t)


def model_config(path: Path, state: dict[str, torch.Tensor], tokenizer: CaptionTokenizer) -> ModelConfig:
    """v2t's ModelConfig of an EasyNLP checkpoint (config.json, train_config.json, the weights)."""
    file = path / CONFIG_FILE
    data = json.loads(file.read_text(encoding="utf-8"))
    try:
        vocab, block, n_layer, n_head, n_embd = (int(data[k]) for k in
                                                  ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{file} lacks a valid {err}: not an EasyNLP video2text config") from None
    if int(data.get("decode_vocab_size", vocab)) != vocab:
        raise ArtifactError(f"{file}: decode_vocab_size {data['decode_vocab_size']} differs from vocab_size "
                            f"{vocab}; v2t's decoder reads and writes one vocabulary")
    if data.get("prefix_encoder_type", "vit") != "vit":
        raise ArtifactError(f"{file}: prefix_encoder_type {data['prefix_encoder_type']!r}; v2t builds the vit one")
    if tokenizer.vocab_size != vocab:
        raise ArtifactError(f"{path / 'vocab.txt'} has {tokenizer.vocab_size} tokens but the model's "
                            f"vocabulary (config.json vocab_size) is {vocab}")
    vit = vit_fields(state, path / WEIGHTS_FILE)
    img_len = (vit["img_size"] // vit["vit_patch_size"]) ** 2
    params = run_parameters(path)
    try:
        frame_num = get_int(params, "frame_num", DEFAULT_FRAME_NUM)
        _expect(params, "text_len", block - img_len, f"block_size {block} - img_len {img_len}")
        _expect(params, "img_len", img_len, "the ViT's positional table")
        _expect(params, "img_size", vit["img_size"], "the ViT's positional table and patch size")
        return ModelConfig(vocab_size=vocab, pad_id=tokenizer.pad_id, frame_num=frame_num,
                           text_len=block - img_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                           freeze_vit=True, **vit)
    except ConfigError as err:
        raise ArtifactError(f"{path}: {err}") from None


def _expect(params: dict[str, str], key: str, derived: int, source: str) -> None:
    given = get_int(params, key)
    if given is not None and given != derived:
        raise ConfigError(f"{TRAIN_CONFIG_FILE} says {key}={given} but {source} give {derived}")


def v2t_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EasyNLP's names are v2t's; only the buffers v2t rebuilds are left out."""
    return {k: v for k, v in state.items() if not _DERIVED.match(k)}


def read_easynlp_checkpoint(directory: str | Path) -> tuple[ModelConfig, CaptionTokenizer, dict[str, torch.Tensor]]:
    """Config, tokenizer and v2t-named weights of an EasyNLP checkpoint directory."""
    path = Path(directory)
    tokenizer = CaptionTokenizer.from_dir(path / "vocab.txt")  # EasyNLP writes the BERT vocab.txt
    state = read_state_dict(path)
    return model_config(path, state, tokenizer), tokenizer, v2t_state_dict(state)
