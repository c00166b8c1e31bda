"""The I/O contract of the exported graphs, declared once.

Export (input/output names, dynamic axes, dummy inputs), validation, the manifest and every
runtime backend read these specs; nothing finds a tensor by sniffing its name.

Decoder graph, one for every step:
  prefix step : input_ids (B, 0), prefix_embeds (B, F, E), empty past (B, nh, 0, hs)
  token step  : input_ids (B, 1), prefix_embeds (B, 0, E), past from the previous step
KV tensors follow the usual naming: ``past_key_values.{i}.key|value`` in,
``present.{i}.key|value`` out; a present is the past with this step's keys appended.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

ENCODER_FILE = "frame_encoder.onnx"
DECODER_FILE = "decoder.onnx"
MANIFEST_FILE = "manifest.json"

# Symbolic axis names. An int in a shape is a fixed size.
BATCH = "batch"
NUM_FRAMES = "num_frames"
NEW_TOKENS = "new_tokens"
PREFIX_LEN = "prefix_len"
STEP_LEN = "step_len"  # prefix_len + new_tokens
PAST_LEN = "past_len"
TOTAL_LEN = "total_len"  # past_len + step_len


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def encoder_contract(cfg: ModelConfig) -> GraphContract:
    """Frames (already CLIP-normalized) → one embedding per frame."""
    return GraphContract(
        inputs=(TensorSpec("frames", "float32", (NUM_FRAMES, 3, cfg.img_size, cfg.img_size)),),
        outputs=(TensorSpec("frame_embeds", "float32", (NUM_FRAMES, cfg.n_embd)),),
    )


def decoder_contract(cfg: ModelConfig) -> GraphContract:
    kv_past = (BATCH, cfg.n_head, PAST_LEN, cfg.head_dim)
    kv_present = (BATCH, cfg.n_head, TOTAL_LEN, cfg.head_dim)
    return GraphContract(
        inputs=(
            TensorSpec("input_ids", "int64", (BATCH, NEW_TOKENS)),
            TensorSpec("prefix_embeds", "float32", (BATCH, PREFIX_LEN, cfg.n_embd)),
            TensorSpec("position_ids", "int64", (BATCH, STEP_LEN)),
            TensorSpec("attention_mask", "int64", (BATCH, TOTAL_LEN)),
            *(TensorSpec(n, "float32", kv_past) for n in past_names(cfg.n_layer)),
        ),
        outputs=(
            # Only the last position's logits: generation never needs the others.
            TensorSpec("logits", "float32", (BATCH, cfg.vocab_size)),
            *(TensorSpec(n, "float32", kv_present) for n in present_names(cfg.n_layer)),
        ),
    )
