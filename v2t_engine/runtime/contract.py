"""The I/O contract of the exported graphs, declared once.

This module is the only place where tensor names are spelled. Export (names, dynamic axes,
example inputs), validation, the manifest and every runtime backend read these specs, and each
backend checks the graphs it loads against them; nothing finds a tensor by sniffing its name.

Three graphs:
  frame_encoder : uint8 crops (N, 3, S, S) → one embedding per frame. CLIP normalisation is the
                  graph's first op (a 768-entry table, the one ``preprocess.normalize`` uses), so
                  frames cross to the device as a quarter of the bytes and captions are unchanged.
  prefill       : each video's frame embeddings (B, F, E) → the logits of its first token and
                  the frames' keys/values, ``kv_out.{i}.key|value`` (B, nh, F, hs).
  decode        : one token per row at its position, over a fixed-length KV buffer
                  ``cache.{i}.key|value`` (B, nh, cache_len, hs) in which a row's column c holds
                  position c. The graph only reads the buffer: it attends to the columns before
                  each row's position plus this step's own key, and returns that key/value as
                  ``kv_out.*`` (B, nh, 1, hs) for the runtime to write into column ``position``
                  of the same buffer. No shape grows from step to step; batch is the only axis
                  that changes during a job (cache_len is fixed by the runtime for its slots), so
                  a CUDA graph or a TensorRT profile is made once per batch bucket.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import ArtifactError

ENCODER_FILE = "frame_encoder.onnx"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
MANIFEST_FILE = "manifest.json"

# Tensor names.
FRAMES = "frames"
FRAME_EMBEDS = "frame_embeds"
INPUT_IDS = "input_ids"
PREFIX_EMBEDS = "prefix_embeds"
POSITION_IDS = "position_ids"
LOGITS = "logits"

# Symbolic axis names. An int in a shape is a fixed size.
BATCH = "batch"
NUM_FRAMES = "num_frames"
PREFIX_LEN = "prefix_len"
CACHE_LEN = "cache_len"

# How example inputs are filled (TensorSpec.fill).
NORMAL, TOKENS, POSITIONS, PIXELS = "normal", "tokens", "positions", "pixels"


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
        positions inside the cache, pixels, or standard normal values."""
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)
        if self.fill == TOKENS:
            return rng.integers(0, vocab_size, shape).astype(self.dtype)
        if self.fill == POSITIONS:  # where a row's token goes: a column of the cache
            return rng.integers(0, sizes[CACHE_LEN], shape).astype(self.dtype)
        if self.fill == PIXELS:
            return rng.integers(0, 256, shape).astype(self.dtype)
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


def cache_names(n_layer: int) -> list[str]:
    """The decode graph's KV buffer inputs, layer-major, key first."""
    return [f"cache.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def kv_out_names(n_layer: int) -> list[str]:
    """The keys/values a prefill or decode computed, in cache_names' order."""
    return [f"kv_out.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def encoder_contract(cfg: ModelConfig) -> GraphContract:
    """uint8 crops (``preprocess.crop_frame``) → one embedding per frame."""
    return GraphContract(
        "frame_encoder",
        inputs=(TensorSpec(FRAMES, "uint8", (NUM_FRAMES, 3, cfg.img_size, cfg.img_size), PIXELS),),
        outputs=(TensorSpec(FRAME_EMBEDS, "float32", (NUM_FRAMES, cfg.n_embd)),),
    )


def prefill_contract(cfg: ModelConfig) -> GraphContract:
    """Frame embeddings at positions 0..F-1 → first-token logits and the frames' keys/values."""
    kv = (BATCH, cfg.n_head, PREFIX_LEN, cfg.head_dim)
    return GraphContract(
        "prefill",
        inputs=(TensorSpec(PREFIX_EMBEDS, "float32", (BATCH, PREFIX_LEN, cfg.n_embd)),),
        outputs=(TensorSpec(LOGITS, "float32", (BATCH, cfg.vocab_size)),
                 *(TensorSpec(n, "float32", kv) for n in kv_out_names(cfg.n_layer))),
    )


def decode_contract(cfg: ModelConfig) -> GraphContract:
    """One token per row at its position over the fixed-length KV buffer (module docstring)."""
    cache = (BATCH, cfg.n_head, CACHE_LEN, cfg.head_dim)
    new = (BATCH, cfg.n_head, 1, cfg.head_dim)
    return GraphContract(
        "decode",
        inputs=(
            TensorSpec(INPUT_IDS, "int64", (BATCH, 1), TOKENS),
            TensorSpec(POSITION_IDS, "int64", (BATCH, 1), POSITIONS),
            *(TensorSpec(n, "float32", cache) for n in cache_names(cfg.n_layer)),
        ),
        outputs=(
            TensorSpec(LOGITS, "float32", (BATCH, cfg.vocab_size)),
            *(TensorSpec(n, "float32", new) for n in kv_out_names(cfg.n_layer)),
        ),
        cache_inputs=2 * cfg.n_layer,
    )


def graph_contracts(cfg: ModelConfig) -> tuple[GraphContract, GraphContract, GraphContract]:
    """Every graph of an export, in manifest order."""
    return encoder_contract(cfg), prefill_contract(cfg), decode_contract(cfg)


def cache_len(cfg: ModelConfig, frame_num: int | None = None, max_new_tokens: int | None = None) -> int:
    """Columns of the KV buffer: every frame and every caption token has one (a caption's last
    token is never fed back, but a column for it keeps positions and columns equal)."""
    return (cfg.frame_num if frame_num is None else frame_num) + (
        cfg.text_len if max_new_tokens is None else max_new_tokens)
