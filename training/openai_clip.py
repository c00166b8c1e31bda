"""OpenAI CLIP ``.pt`` files (what EasyNLP's ``vit_ckpt_path=ViT-L/14`` resolves to), read without
running them.

They are TorchScript archives: a zip whose ``data.pkl`` pickles the module tree (objects of
``__torch__.*`` classes holding tensors and submodules as attributes) with tensor storages in
``data/N``, beside the TorchScript ``code/`` that ``torch.jit.load`` would compile and run. v2t
needs only the weights, so it unpickles ``data.pkl`` with a restricted unpickler: module objects
become plain attribute holders, tensors are rebuilt from the stored bytes, and any other global
is refused. No code from the archive runs.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from v2t_engine.errors import ArtifactError

_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}
VIT_HEAD_DIM = 64  # every OpenAI CLIP ViT uses 64-wide attention heads
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


class _Module:
    """A ``__torch__.*`` object: its attributes, nothing else."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_: Any) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


class _WeightsOnly(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(__import__("io").BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _Module
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise pickle.UnpicklingError(f"refused {module}.{name}: only weights are read from the archive")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def read_torchscript_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a TorchScript archive by its dotted attribute path ("visual.conv1.weight")."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pickles:
                raise ArtifactError(f"{path} is not a TorchScript archive (no data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            root = _WeightsOnly(archive.read(pickles[0]), archive, prefix).load()
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
        raise ArtifactError(f"cannot read the weights of {path}: {type(err).__name__}: {err}") from None
    weights: dict[str, torch.Tensor] = {}
    _collect(root, "", weights)
    return weights


def _collect(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _Module):
            _collect(value, f"{prefix}{name}.", out)


def clip_visual_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``visual.*`` weights of an OpenAI CLIP archive in the OpenAI layout (v2t's frame
    encoder uses the same names), as float32."""
    weights = read_torchscript_weights(path)
    visual = {k[len("visual."):]: v.float() for k, v in weights.items() if k.startswith("visual.")}
    if not visual:
        raise ArtifactError(f"{path} holds no visual.* weights: not an OpenAI CLIP model")
    return visual


def vit_shape(state: dict[str, torch.Tensor], where: str) -> dict[str, int]:
    """The ViT's shape read off OpenAI-layout weights, as EasyNLP infers it: width and patch from
    conv1, layers from the resblocks, heads = width / 64, image size from the positional table."""
    try:
        conv, positions = state["conv1.weight"], state["positional_embedding"]  # (width, 3, p, p), (grid^2+1, width)
    except KeyError as err:
        raise ArtifactError(f"{where} has no {err.args[0]}: its frame encoder is not an OpenAI CLIP ViT, "
                            "the only one v2t builds") from None
    width, channels, patch, patch_w = conv.shape
    grid = round((positions.shape[0] - 1) ** 0.5)
    layers = 1 + max((int(m.group(1)) for k in state if (m := _RESBLOCK.match(k))), default=-1)
    if channels != 3 or patch != patch_w or grid * grid + 1 != positions.shape[0] or layers == 0 \
            or width % VIT_HEAD_DIM:
        raise ArtifactError(f"{where}: the frame encoder (conv1 {tuple(conv.shape)}, positions "
                            f"{tuple(positions.shape)}, {layers} blocks) is not a CLIP ViT v2t can build")
    return {"vit_width": width, "vit_layers": layers, "vit_heads": width // VIT_HEAD_DIM,
            "vit_patch_size": patch, "img_size": grid * patch}
