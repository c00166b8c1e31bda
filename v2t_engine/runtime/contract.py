"""The I/O contract of the exported graphs, declared once.

This module is the only place where tensor names are spelled. Export (names, dynamic axes,
example inputs), validation, the manifest and every runtime backend read these specs, and each
backend checks the graphs it loads against them; nothing finds a tensor by sniffing its name.

Decoder graph, one for every step:
  prefix step : input_ids (B, 0), prefix_embeds (B, F, E), empty past (B, nh, 0, hs)
  token step  : input_ids (B, 1), prefix_embeds (B, 0, E), past from the previous step
KV tensors follow the usual naming: ``past_key_values.{i}.key|value`` in,
``present.{i}.key|value`` out; a present is the past with this step's keys appended.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import ArtifactError

ENCODER_FILE = "frame_encoder.onnx"
DECODER_FILE = "decoder.onnx"
MANIFEST_FILE = "manifest.json"

# Tensor names.
FRAMES = "frames"
FRAME_EMBEDS = "frame_embeds"
INPUT_IDS = "input_ids"
PREFIX_EMBEDS = "prefix_embeds"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"

# Symbolic axis names. An int in a shape is a fixed size.
BATCH = "batch"
NUM_FRAMES = "num_frames"
NEW_TOKENS = "new_tokens"
PREFIX_LEN = "prefix_len"
STEP_LEN = "step_len"  # prefix_len + new_tokens
PAST_LEN = "past_len"
TOTAL_LEN = "total_len"  # past_len + step_len

# How example inputs are filled (TensorSpec.fill).
NORMAL, TOKENS, POSITIONS, ONES = "normal", "tokens", "positions", "ones"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]
    fill: str = NORMAL  # what a valid example holds: see `example`

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def example(self, sizes: Mapping[str, int], rng: np.random.Generator, vocab_size: int) -> np.ndarray:
        """A valid value of this tensor for the axis sizes given: token ids in the vocabulary,
        positions that continue after the past, an all-ones mask, or standard normal values."""
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)
        if self.fill == TOKENS:
            return rng.integers(0, vocab_size, shape).astype(self.dtype)
        if self.fill == POSITIONS:
            start = sizes.get(PAST_LEN, 0)
            return np.broadcast_to(np.arange(start, start + shape[-1]), shape).astype(self.dtype)
        if self.fill == ONES:
            return np.ones(shape, self.dtype)
        return rng.standard_normal(shape).astype(self.dtype)

    def check(self, dtype: str, shape: Sequence[int | str | None], where: str) -> None:
        """ArtifactError naming this tensor when a graph declares another dtype, rank, or a fixed
        size where the contract has another size or a dynamic axis."""
        if dtype != self.dtype:
            raise ArtifactError(f"{where}: tensor {self.name!r} is {dtype}, the contract says {self.dtype}")
        if len(shape) != len(self.shape):
            raise ArtifactError(f"{where}: tensor {self.name!r} has rank {len(shape)}, the contract "
                                f"says {len(self.shape)} {list(self.shape)}")
        for axis, (got, want) in enumerate(zip(shape, self.shape)):
            if isinstance(got, int) and got != want:
                what = f"the dynamic axis {want!r}" if isinstance(want, str) else f"size {want}"
                raise ArtifactError(f"{where}: tensor {self.name!r} axis {axis} is fixed to {got}, "
                                    f"the contract says {what}")


@dataclass(frozen=True)
class GraphContract:
    name: str  # the graph's key in manifest.json
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cache_inputs: int = 0  # the last inputs are the KV cache: one sequence argument when traced

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    def example(self, sizes: Mapping[str, int], seed: int = 0, vocab_size: int = 1) -> dict[str, np.ndarray]:
        """Valid example inputs, by name in contract order (export traces with them; validation
        runs them)."""
        rng = np.random.default_rng(seed)
        return {t.name: t.example(sizes, rng, vocab_size) for t in self.inputs}

    def check(self, inputs: Iterable[tuple[str, str, Sequence]], outputs: Iterable[tuple[str, str, Sequence]],
              where: str) -> None:
        """Check a loaded graph's declared (name, dtype, shape) inputs and outputs against the
        contract; ArtifactError naming the first tensor that is missing, unexpected or different."""
        for kind, specs, declared in (("input", self.inputs, list(inputs)), ("output", self.outputs, list(outputs))):
            by_name = {name: (dtype, shape) for name, dtype, shape in declared}
            for spec in specs:
                if spec.name not in by_name:
                    raise ArtifactError(f"{where}: the graph has no {kind} {spec.name!r} "
                                        f"(the contract's {kind}s: {', '.join(t.name for t in specs)})")
                spec.check(*by_name.pop(spec.name), where)
            if by_name:
                raise ArtifactError(f"{where}: the graph has {kind}(s) the contract does not know: "
                                    f"{', '.join(sorted(by_name))}")


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def encoder_contract(cfg: ModelConfig) -> GraphContract:
    """Frames (already CLIP-normalized) → one embedding per frame."""
    return GraphContract(
        "frame_encoder",
        inputs=(TensorSpec(FRAMES, "float32", (NUM_FRAMES, 3, cfg.img_size, cfg.img_size)),),
        outputs=(TensorSpec(FRAME_EMBEDS, "float32", (NUM_FRAMES, cfg.n_embd)),),
    )


def decoder_contract(cfg: ModelConfig) -> GraphContract:
    kv_past = (BATCH, cfg.n_head, PAST_LEN, cfg.head_dim)
    kv_present = (BATCH, cfg.n_head, TOTAL_LEN, cfg.head_dim)
    return GraphContract(
        "decoder",
        inputs=(
            TensorSpec(INPUT_IDS, "int64", (BATCH, NEW_TOKENS), TOKENS),
            TensorSpec(PREFIX_EMBEDS, "float32", (BATCH, PREFIX_LEN, cfg.n_embd)),
            TensorSpec(POSITION_IDS, "int64", (BATCH, STEP_LEN), POSITIONS),
            TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL_LEN), ONES),
            *(TensorSpec(n, "float32", kv_past) for n in past_names(cfg.n_layer)),
        ),
        outputs=(
            # Only the last position's logits: generation never needs the others.
            TensorSpec(LOGITS, "float32", (BATCH, cfg.vocab_size)),
            *(TensorSpec(n, "float32", kv_present) for n in present_names(cfg.n_layer)),
        ),
        cache_inputs=2 * cfg.n_layer,
    )


def decoder_sizes(batch: int, new_tokens: int, prefix_len: int, past_len: int) -> dict[str, int]:
    """Every decoder axis from the four free ones."""
    step = prefix_len + new_tokens
    return {BATCH: batch, NEW_TOKENS: new_tokens, PREFIX_LEN: prefix_len, STEP_LEN: step,
            PAST_LEN: past_len, TOTAL_LEN: past_len + step}


@dataclass(frozen=True)
class DecoderInputs:
    """One decoder call's inputs besides the cache, as numpy arrays."""

    input_ids: np.ndarray  # (B, new_tokens) int64
    prefix_embeds: np.ndarray  # (B, prefix_len, E) float32
    position_ids: np.ndarray  # (B, step_len) int64
    attention_mask: np.ndarray  # (B, total_len) int64; 0 hides a cache column from the row

    @classmethod
    def prefix_step(cls, prefix: np.ndarray) -> "DecoderInputs":
        """The frames of each video (B, F, E) at positions 0..F-1, from an empty past."""
        B, F, _ = prefix.shape
        return cls(np.zeros((B, 0), np.int64), prefix.astype(np.float32, copy=False),
                   np.tile(np.arange(F, dtype=np.int64), (B, 1)), np.ones((B, F), np.int64))

    @classmethod
    def token_step(cls, tokens: np.ndarray, positions: np.ndarray, attention_mask: np.ndarray,
                   n_embd: int) -> "DecoderInputs":
        """One token per row (B, 1) at its position (B, 1), with no frames."""
        B = tokens.shape[0]
        return cls(tokens, np.zeros((B, 0, n_embd), np.float32), positions, attention_mask)

    def feeds(self) -> dict[str, np.ndarray]:
        """By contract name, in contract order."""
        return {INPUT_IDS: self.input_ids, PREFIX_EMBEDS: self.prefix_embeds,
                POSITION_IDS: self.position_ids, ATTENTION_MASK: self.attention_mask}

    @classmethod
    def from_feeds(cls, feeds: Mapping[str, np.ndarray]) -> "DecoderInputs":
        return cls(feeds[INPUT_IDS], feeds[PREFIX_EMBEDS], feeds[POSITION_IDS], feeds[ATTENTION_MASK])
