"""Training checkpoints: one directory, written atomically, readable without pickles.

Layout::

    checkpoint_dir/
      config.json          ModelConfig (the architecture)
      model.safetensors    the whole state dict, frozen ViT included (so inference needs nothing else)
      tokenizer.json, vocab.txt, tokenizer_config.json
      training_state.pt    optimizer, scheduler, step, epoch, RNG states, training options
      trainer_state.json   human-readable progress: step, epoch, validation losses

Everything is first written into a temporary sibling directory, then moved into place file by
file by file with ``os.replace`` (atomic on one filesystem), ``trainer_state.json`` last: an interrupted
save leaves the previous checkpoint's files or the new ones, never a half-written file. A save
that fails while writing (a full disk, permissions) is one OutputError naming the file, and the
previous checkpoint is left as it was.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from v2t_engine.config import CONFIG_FILE, ModelConfig
from v2t_engine.errors import ArtifactError, OutputError, V2TError
from v2t_engine.tokenizer import CaptionTokenizer

from v2t_training.easynlp import easynlp_model_type, is_easynlp_checkpoint, read_easynlp_checkpoint
from v2t_training.model import VideoCaptioner

MODEL_FILE = "model.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"


def is_v2t_checkpoint(path: str | Path) -> bool:
    """True for a directory holding a v2t model (config.json + model.safetensors)."""
    return (Path(path) / MODEL_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def is_checkpoint(path: str | Path) -> bool:
    """True for a directory holding a model v2t loads: its own checkpoint or an EasyNLP video2text
    one (easynlp.py), which every entry point that takes a checkpoint accepts."""
    return is_v2t_checkpoint(path) or is_easynlp_checkpoint(path)


def is_resumable(path: str | Path) -> bool:
    """True for a directory a run can continue from with --resume (it holds training_state.pt)."""
    return (Path(path) / TRAINING_STATE_FILE).is_file()


def save_checkpoint(checkpoint_dir: str | Path, model: VideoCaptioner, tokenizer: CaptionTokenizer,
                    training_state: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (see the module docstring). Without ``training_state`` the
    directory holds a model only, and stale state files from an earlier run are removed so they
    can never be resumed against the wrong weights."""
    target = Path(checkpoint_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise OutputError(f"cannot save a checkpoint in {target}: {err.strerror or err}") from None
    try:
        _write_all(tmp, target, model, tokenizer, training_state, trainer_state)
        names = sorted(p.name for p in tmp.iterdir())
        names.sort(key=lambda n: n == TRAINER_STATE_FILE)  # the "done" marker goes last
        for name in names:
            try:
                os.replace(tmp / name, target / name)
            except OSError as err:
                raise OutputError(f"cannot move {name} into {target}: {err.strerror or err}; the checkpoint "
                                  "there may now mix files of the previous save and this one") from None
        for name, written in ((TRAINING_STATE_FILE, training_state), (TRAINER_STATE_FILE, trainer_state)):
            if written is None:
                (target / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_all(tmp: Path, target: Path, model: VideoCaptioner, tokenizer: CaptionTokenizer,
               training_state: dict[str, Any] | None, trainer_state: dict[str, Any] | None) -> None:
    """Every file of the checkpoint into `tmp`; nothing in `target` is touched."""
    from safetensors.torch import save_file

    # safetensors refuses views and shared storage: give it plain contiguous copies.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    steps: list[tuple[str, Callable[[], Any]]] = [
        (CONFIG_FILE, lambda: model.cfg.save(tmp)),
        (MODEL_FILE, lambda: save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})),
        ("tokenizer files", lambda: tokenizer.save(tmp)),
    ]
    if training_state is not None:
        steps.append((TRAINING_STATE_FILE, lambda: torch.save(training_state, tmp / TRAINING_STATE_FILE)))
    if trainer_state is not None:
        steps.append((TRAINER_STATE_FILE, lambda: (tmp / TRAINER_STATE_FILE).write_text(
            json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")))
    mode = _file_mode()
    # safetensors creates its file 0600; give all files the umask's mode
    steps.append(("file modes", lambda: [path.chmod(mode) for path in tmp.iterdir()]))
    for name, write in steps:
        try:
            write()
        except V2TError:
            raise
        except Exception as err:  # noqa: BLE001 - torch and safetensors wrap I/O errors in their own types
            raise OutputError(f"cannot save the checkpoint in {target}: writing {name} failed: {_why(err, tmp)}; "
                              "the previous checkpoint there is unchanged") from None


def _why(err: Exception, directory: Path) -> str:
    """An I/O failure in words. torch and safetensors report a full disk in their own words
    (torch: "unexpected pos ..."), so the free space is added when it is nearly none."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    reason = f"{type(err).__name__}: {err}"
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return reason
    return reason + (f" (only {free} bytes are free there: the disk looks full)" if free < 1 << 20 else "")


def _file_mode() -> int:
    """0666 minus the process umask: the mode a plain open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _require(directory: Path, names: list[str]) -> None:
    if not directory.is_dir():
        raise ArtifactError(f"checkpoint directory {str(directory)!r} does not exist")
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise ArtifactError(f"{str(directory)!r} is not a complete v2t checkpoint: missing {', '.join(missing)}")


def read_checkpoint(checkpoint_dir: str | Path, weights: bool = True
                    ) -> tuple[ModelConfig, CaptionTokenizer, dict[str, torch.Tensor] | None]:
    """The config, tokenizer and (with `weights`) state dict, CPU tensors, of a v2t or an EasyNLP
    checkpoint. An EasyNLP checkpoint's config needs its weights (the ViT's shape), so they are
    always read there."""
    directory = Path(checkpoint_dir)
    if is_easynlp_checkpoint(directory):
        cfg, tokenizer, state = read_easynlp_checkpoint(directory)
    elif (model_type := easynlp_model_type(directory)) is not None and not is_v2t_checkpoint(directory):
        raise ArtifactError(f"{directory / CONFIG_FILE} has model_type {model_type!r}: v2t reads its own "
                            "checkpoints and EasyNLP video2text ones (model_type mingpt_i2t)")
    else:
        _require(directory, [CONFIG_FILE, MODEL_FILE])
        try:
            cfg, tokenizer = ModelConfig.load(directory), CaptionTokenizer.from_dir(directory)
        except V2TError as exc:
            raise ArtifactError(f"cannot load checkpoint {str(directory)!r}: {exc}") from None
        state = _read_safetensors(directory / MODEL_FILE) if weights else None
    if (tokenizer.vocab_size, tokenizer.pad_id) != (cfg.vocab_size, cfg.pad_id):
        raise ArtifactError(f"{str(directory)!r}: the tokenizer (vocab {tokenizer.vocab_size}, pad {tokenizer.pad_id}) "
                            f"does not match the model (vocab {cfg.vocab_size}, pad {cfg.pad_id})")
    return cfg, tokenizer, state


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError
        raise ArtifactError(f"cannot read {file}: {exc}") from None


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``state`` into ``module`` strictly; an ArtifactError starting with ``what`` lists the
    keys missing or unexpected, or names the key whose shape differs with both shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ArtifactError(f"{what}: " + "; ".join(
            f"{label} {len(keys)} key(s): {', '.join(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ArtifactError(f"{what}: {key} has shape {tuple(tensor.shape)} in the checkpoint, "
                                f"{tuple(own[key].shape)} in the model")
    module.load_state_dict(state, strict=True)


def load_weights_into(model: nn.Module, checkpoint_dir: str | Path) -> None:
    """Copy a checkpoint's weights into ``model`` strictly, with an ArtifactError naming what differs."""
    load_strict(model, read_checkpoint(checkpoint_dir)[2], f"weights in {str(checkpoint_dir)!r} do not fit the model")


def load_model(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[VideoCaptioner, CaptionTokenizer]:
    """The trained model (in eval mode, on ``map_location``) and its tokenizer, for inference."""
    cfg, tokenizer, state = read_checkpoint(checkpoint_dir)
    model = VideoCaptioner(cfg)
    load_strict(model, state, f"weights in {str(checkpoint_dir)!r} do not fit the model")
    return model.to(map_location).eval(), tokenizer


def load_training_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """training_state.pt, read with ``weights_only=True`` (no arbitrary code from a pickle)."""
    directory = Path(checkpoint_dir)
    _require(directory, [TRAINING_STATE_FILE])
    try:
        return torch.load(directory / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... on bad files
        raise ArtifactError(f"cannot read {directory / TRAINING_STATE_FILE}: {exc}") from None


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in types ``torch.load(weights_only=True)`` accepts
    (numpy's key array becomes a tensor)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


def _tuples(x: Any) -> Any:
    """random.setstate needs tuples where a round trip may have produced lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
