"""Load CLIP vision weights into the OpenAI-CLIP-layout frame encoder (``vit_ckpt_path``).

EasyNLP's ``vit_ckpt_path=ViT-L/14`` downloads OpenAI's weights at run time; v2t never downloads,
so ``vit_ckpt_path`` names a local copy: OpenAI's ``.pt`` file itself (the file ``ViT-L/14``
resolves to; read without running it, openai_clip.py), or a Hugging Face directory (e.g. a saved
``openai/clip-vit-large-patch14``, a CLIPModel, CLIPVisionModel or CLIPVisionModelWithProjection),
whose config gives the ViT's shape and whose weights are renamed key by key into our
``first_stage_model`` (OpenAI layout, EASYNLP.md §8), q/k/v concatenated into ``in_proj``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from v2t_engine.errors import ArtifactError, ConfigError

from v2t_training.checkpoint import load_strict
from v2t_training.openai_clip import clip_visual_weights, vit_shape

# CLIPVisionConfig's defaults: save_pretrained may leave default values out of config.json.
_HF_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


@dataclass(frozen=True)
class ClipVisionSpec:
    """The shape of a Hugging Face CLIP vision tower, in ModelConfig's terms."""

    vit_width: int
    vit_layers: int
    vit_heads: int
    vit_patch_size: int
    img_size: int
    vit_act: str
    vit_layer_norm_eps: float

    def config_fields(self) -> dict[str, object]:
        """The ModelConfig fields this spec fixes."""
        return {"vit_width": self.vit_width, "vit_layers": self.vit_layers, "vit_heads": self.vit_heads,
                "vit_patch_size": self.vit_patch_size, "img_size": self.img_size,
                "vit_act": self.vit_act, "vit_layer_norm_eps": self.vit_layer_norm_eps}


def read_clip_vision_spec(path: str | Path) -> ClipVisionSpec:
    """The ViT's shape: from an OpenAI ``.pt`` file's weights, or from config.json of a CLIPModel
    (``vision_config`` inside) or a CLIPVision* model."""
    directory = Path(path)
    if directory.is_file():
        shape = vit_shape(clip_visual_weights(directory), str(directory))
        return ClipVisionSpec(**shape, vit_act="quick_gelu", vit_layer_norm_eps=1e-5)  # OpenAI CLIP's
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"vit_ckpt_path {str(directory)!r} is neither an OpenAI CLIP .pt file nor a Hugging Face "
                          "CLIP directory (with config.json). v2t does not download weights: pass the .pt file "
                          "EasyNLP's ViT-L/14 resolves to (~/.cache/clip/ViT-L-14.pt), or a directory saved with "
                          "transformers' save_pretrained (e.g. openai/clip-vit-large-patch14).")
    try:
        top = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{config_path} is not valid JSON: {exc}") from None
    vision = top.get("vision_config", top)
    if "vision_config" not in top and top.get("model_type") not in (None, "clip_vision_model"):
        raise ConfigError(f"{config_path} is a {top.get('model_type')!r} config, not a CLIP vision config")
    cfg = {**_HF_DEFAULTS, **vision}
    if cfg["hidden_act"] not in _ACTS:
        raise ConfigError(f"{config_path}: hidden_act {cfg['hidden_act']!r} is not supported (quick_gelu or gelu)")
    if cfg["intermediate_size"] != 4 * cfg["hidden_size"]:
        raise ConfigError(f"{config_path}: intermediate_size {cfg['intermediate_size']} is not 4 x hidden_size "
                          f"({cfg['hidden_size']}), which the OpenAI CLIP layout assumes")
    return ClipVisionSpec(
        vit_width=int(cfg["hidden_size"]), vit_layers=int(cfg["num_hidden_layers"]),
        vit_heads=int(cfg["num_attention_heads"]), vit_patch_size=int(cfg["patch_size"]),
        img_size=int(cfg["image_size"]), vit_act=_ACTS[cfg["hidden_act"]],
        vit_layer_norm_eps=float(cfg["layer_norm_eps"]))


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint: model.safetensors (possibly sharded) or pytorch_model.bin."""
    from safetensors.torch import load_file

    directory = Path(path)
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    if (directory / "pytorch_model.bin").is_file():
        # weights_only: a pickle can run code when loaded (EASYNLP.md §8).
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ArtifactError(f"no weights in {str(directory)!r}: expected model.safetensors, "
                        "model.safetensors.index.json or pytorch_model.bin")


def convert_hf_clip_vision(hf: dict[str, torch.Tensor], layers: int, n_embd: int) -> dict[str, torch.Tensor]:
    """Rename HF CLIP vision weights to the OpenAI layout of ``VisionTransformer``.

    The projection follows EasyNLP: dropped when ``n_embd`` equals the ViT width, otherwise
    ``proj = visual_projection.weight.T`` ([width, proj_dim]), which needs proj_dim == n_embd.
    """
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf) else ""

    def get(name: str) -> torch.Tensor:
        try:
            return hf[prefix + name]
        except KeyError:
            raise ArtifactError(f"HF CLIP checkpoint lacks {prefix + name}") from None

    out = {
        "conv1.weight": get("embeddings.patch_embedding.weight"),
        "class_embedding": get("embeddings.class_embedding"),
        "positional_embedding": get("embeddings.position_embedding.weight"),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):  # sic: HF's "layrnorm"
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = get(f"{theirs}.{p}")
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[dst + "attn.in_proj_weight"] = torch.cat([get(src + f"self_attn.{x}_proj.weight") for x in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([get(src + f"self_attn.{x}_proj.bias") for x in "qkv"])
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"), ("ln_2", "layer_norm2")):
            for p in ("weight", "bias"):
                out[f"{dst}{ours}.{p}"] = get(f"{src}{theirs}.{p}")
    if f"{prefix}encoder.layers.{layers}.layer_norm1.weight" in hf:
        raise ArtifactError(f"HF CLIP checkpoint has more than the {layers} layers its config declares")

    width = out["class_embedding"].shape[0]
    if n_embd != width:
        proj = hf.get("visual_projection.weight")  # (proj_dim, width)
        if proj is None:
            raise ConfigError(f"the CLIP checkpoint has no visual_projection, so n_embd must equal its width "
                              f"({width}); got n_embd={n_embd}")
        if proj.shape[0] != n_embd:
            raise ConfigError(f"n_embd={n_embd} matches neither the CLIP width ({width}, projection dropped) "
                              f"nor its projection_dim ({proj.shape[0]})")
        out["proj"] = proj.t().contiguous()  # (width, n_embd): OpenAI's x @ proj
    return out


def _openai_projection(state: dict[str, torch.Tensor], n_embd: int) -> dict[str, torch.Tensor]:
    """EasyNLP's rule: CLIP's proj is dropped when n_embd equals the ViT width, else it must map
    the width to n_embd."""
    width = state["class_embedding"].shape[0]
    proj = state.pop("proj", None)
    if n_embd == width:
        return state
    if proj is None or proj.shape[1] != n_embd:
        raise ConfigError(f"n_embd={n_embd} matches neither the CLIP width ({width}, projection dropped) nor "
                          f"its projection ({None if proj is None else tuple(proj.shape)})")
    return {**state, "proj": proj}


def load_clip_vision(module: torch.nn.Module, path: str | Path, n_embd: int, layers: int) -> None:
    """Copy CLIP vision weights (an OpenAI ``.pt`` file or a HF directory) into ``module`` (a
    VisionTransformer), strictly."""
    if Path(path).is_file():
        state = _openai_projection(clip_visual_weights(path), n_embd)
    else:
        state = convert_hf_clip_vision(read_hf_state_dict(path), layers, n_embd)
    load_strict(module, state, f"CLIP weights from {str(path)!r} do not fit the frame encoder")
