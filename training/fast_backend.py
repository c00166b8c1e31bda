"""A fast PyTorch backend over a training checkpoint (issue #10), in the manner of gpt-fast.

The reference backend (torch_backend.py) keeps the KV cache in host memory and copies it through
numpy on every step, which is right for checking the math and far too slow on a GPU. This one keeps
a static cache on the device and sends back only what a search asks for:

- ``StaticSlotDecoder`` allocates per layer key and value buffers ``[slots, n_head, max_len,
  head_dim]`` once (max_len = frames + max_new_tokens). Each row's video starts at column 0 and
  ``pos`` (on the device) says how many columns the row holds; a step writes each row's new column
  at its own position in place and attends over all columns with the mask ``col <= pos[row]``.
  Shapes never change, so a step can be captured as a CUDA graph, once per batch bucket (rows up
  to the highest live slot, rounded up to a power of two), and replayed with one launch.
- bf16 / fp16 on CUDA (``precision``): the decoder's Linear weights in the compute dtype under
  autocast, which keeps LayerNorm and softmax in fp32; its residual stream stays fp32, and the
  logits come out of the output head in fp32. The ViT runs wholly in the compute dtype (its
  LayerNorm kernel and attention accumulate in fp32): it is most of the work, and memory-bound
  between its matmuls.
- ``encode_frames`` takes uint8 crops and normalizes on the device with the very table
  ``preprocess.normalize`` uses, so a quarter of the bytes cross the bus and the encoder sees
  bit-identical pixels. On CUDA the ViT is compiled by inductor (fused LayerNorm, bias and
  activation kernels) for one static frame count, ``ENCODER_CHUNK``: a call's frames run in whole
  chunks through the compiled ViT and the rest eagerly, so a served request's few frames are never
  padded and only one shape is ever compiled (seconds, the first time; inductor keeps the result
  on disk for the next process). ``V2T_TORCH_COMPILE`` chooses how (``compiled_vit``): block by
  block (the default), as one graph (``graph``) or not at all (``0``).

On the CPU it runs fp32 and eager (no graphs): that is how CI checks it against the reference
(tests/test_fast_backend.py: the same greedy tokens through the real generator).
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from v2t_engine.errors import ConfigError
from v2t_engine.inputs.preprocess import NORMALIZE_TABLE
from v2t_engine.runtime.slot_decoder import active_rows, bucket

from .model import CaptionDecoder, DecoderBlock
from .torch_backend import TorchBackend

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """The torch device for ``--device``, or a ConfigError saying why it cannot be used."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device PyTorch knows; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: the torch-fast backend runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible to PyTorch "
                          "(torch.cuda.is_available() is False); use --device cpu")
    return dev


def compute_dtype(device: torch.device, precision: str | None) -> torch.dtype:
    """bf16 on CUDA and fp32 on the CPU unless asked otherwise. The CPU runs fp32 only: its
    bf16/fp16 kernels are slower than fp32 there and would only lose accuracy."""
    if precision is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: the torch-fast backend computes in one of "
                          f"{', '.join(PRECISIONS)}")
    if device.type == "cpu" and precision != "fp32":
        raise ConfigError(f"--precision {precision}: the torch-fast backend runs fp32 on the CPU; "
                          f"{precision} needs --device cuda")
    return PRECISIONS[precision]


# The frame count the ViT is compiled for on CUDA: a full predict refill's frames run in chunks of
# it (README, "GPU", has the compiled and eager rates).
ENCODER_CHUNK = 256


def fast_decoder(decoder: CaptionDecoder, dtype: torch.dtype) -> CaptionDecoder:
    """A second module tree over the decoder for the fast path, its head left out (the caller runs
    it: the logits must come out in fp32). Linear weights are copies in `dtype`; everything else
    (embeddings, LayerNorm) is shared with the fp32 reference, which `decoder_step` keeps using.
    In fp32 the Linear weights are shared too, so nothing is copied."""
    shared = {}
    for m in decoder.modules():
        if m is not decoder.head and (dtype == torch.float32 or not isinstance(m, nn.Linear)):
            shared.update({id(p): p for p in m.parameters(recurse=False)})
    head, decoder.head = decoder.head, nn.Identity()
    try:
        fast = copy.deepcopy(decoder, shared)  # deepcopy's memo: the shared parameters map to themselves
    finally:
        decoder.head = head
    for m in fast.modules():
        if isinstance(m, nn.Linear):
            m.to(dtype)
    return fast


def mm_to_fp32_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs here for `dtype` inputs (cuBLAS
    accumulates in fp32 and can write fp32, since PyTorch 2.8; the CPU cannot)."""
    if device.type != "cuda" or dtype == torch.float32:
        return False
    try:
        a = torch.ones(2, 8, device=device, dtype=dtype)
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


# V2T_TORCH_COMPILE: how the ViT is compiled on CUDA (README, "GPU", has what each measured).
# "blocks" (the default): block by block, its first call under half as long as the whole graph's;
# "graph": the whole ViT as one graph, whose calls alone ran a few percent faster (inductor fuses
# across blocks) but whose predict jobs did not, start-up aside; "0": not at all.
COMPILE_MODES = ("blocks", "graph", "0")


def compiled_vit(vit: nn.Module):
    """The ViT as V2T_TORCH_COMPILE asks for it, compiled for one static frame count (None: eager)."""
    mode = os.environ.get("V2T_TORCH_COMPILE", "blocks")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"V2T_TORCH_COMPILE={mode}: want one of {', '.join(COMPILE_MODES)}")
    if mode == "0":
        return None
    return torch.compile(vit, dynamic=False) if mode == "graph" else RegionallyCompiledViT(vit)


class RegionallyCompiledViT:
    """The ViT compiled by inductor for one static frame count, block by block (PyTorch's
    "regional compilation"): its blocks are one class with parameters of the same shapes, so one
    compiled block's code serves all but the last, which has a compile of its own (its class
    token alone, model.py). The patch embedding and the pooling, a few percent of the work, stay
    eager."""

    def __init__(self, vit: nn.Module):
        *blocks, last = vit.transformer.resblocks
        self.vit = vit
        self.blocks = [torch.compile(block, dynamic=False) for block in blocks]
        self.last = torch.compile(last.first_token, dynamic=False)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.vit.embed(frames)
        for block in self.blocks:
            x = block(x)
        return self.vit.pool(self.last(x))


class FastTorchBackend(TorchBackend):
    name = "torch-fast"
    loads = TorchBackend.loads

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", threads: int | None = None,
                 verify: bool = False, precision: str | None = None):
        dev = resolve_device(device)
        self.dtype = compute_dtype(dev, precision)  # both checked before minutes of loading
        super().__init__(checkpoint_dir, device=str(dev), threads=threads, verify=verify)
        self.precision = next(name for name, dtype in PRECISIONS.items() if dtype == self.dtype)
        # Steps are captured as CUDA graphs on CUDA; False runs them eagerly (tests compare both).
        self.cuda_graphs = dev.type == "cuda"
        # The reference decoder (self.model.transformer, fp32) stays as it is for decoder_step; the
        # encoder is used by encode_frames alone, so it is cast in place rather than copied. It
        # runs wholly in the compute dtype, without autocast: autocast's fp32 LayerNorm outputs
        # and the casts back cost 2x the bytes of every activation (the ViT's elementwise work is
        # memory-bound), while PyTorch's LayerNorm kernel and SDPA already accumulate their
        # statistics and softmax in fp32 for 16-bit inputs.
        self.model.first_stage_model.to(self.dtype)
        self.device_decoder = fast_decoder(self.model.transformer, self.dtype)
        head = self.model.transformer.head.weight.detach()  # (V, E)
        # bf16 logits would round a logit of 10 to steps of 0.06 and turn near ties around; the
        # head then computes from bf16 inputs into fp32, or in fp32 where cuBLAS cannot do that.
        self.head_weight = head.to(self.dtype) if mm_to_fp32_works(dev, self.dtype) else head
        self.compiled_vit = compiled_vit(self.model.first_stage_model) if dev.type == "cuda" else None
        self.lut = torch.from_numpy(NORMALIZE_TABLE.copy()).reshape(-1).to(dev)  # (3 * 256,) channel-major
        self.lut_offsets = (torch.arange(3, dtype=torch.int32, device=dev) * 256).view(1, 3, 1, 1)
        # On CUDA the generator encodes the next videos on other threads while it decodes
        # (generator.EncodeAhead; V2T_ENCODE_AHEAD=0 encodes in each refill instead). The encoder
        # runs on a stream of its own, so its kernels interleave with the decoder's steps instead
        # of queueing in front of them.
        self.encodes_ahead = dev.type == "cuda" and os.environ.get("V2T_ENCODE_AHEAD", "1") != "0"
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the weights and tables above, before another stream reads them
        self.encoder_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    def autocast(self):
        """Linear, conv and attention in the compute dtype; LayerNorm and softmax in fp32. The
        cache of cast weights stays off: the weights are already cast, and a CUDA graph capture
        must not hold autocast's cache."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, E) final hidden states → (n, V) float32 logits."""
        with torch.autocast(self.device.type, enabled=False):
            if self.head_weight.dtype == torch.float32:
                return F.linear(h.float(), self.head_weight)
            return torch.mm(h.to(self.dtype), self.head_weight.t(), out_dtype=torch.float32)

    def device_frames(self, frames: np.ndarray) -> torch.Tensor:
        """(N, 3, S, S) uint8 crops or normalized float32 → normalized float32 on the device."""
        t = torch.from_numpy(np.ascontiguousarray(frames))
        if frames.dtype != np.uint8:
            return t.to(self.device, torch.float32)
        if self.device.type == "cuda":
            t = t.pin_memory()  # an asynchronous copy needs page-locked memory
        t = t.to(self.device, non_blocking=True)
        # normalize() looks each channel's value up in NORMALIZE_TABLE; the same lookup on the device gives
        # the same float32 values, bit for bit.
        return self.lut[t.int() + self.lut_offsets]

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Thread-safe: on CUDA, every call's work goes to the encoder's stream, in call order,
        and each call waits for its own result only."""
        stream = torch.cuda.stream(self.encoder_stream) if self.encoder_stream is not None else contextlib.nullcontext()
        with stream:
            x = self.device_frames(frames).to(self.dtype)
            whole = len(x) - len(x) % ENCODER_CHUNK if self.compiled_vit is not None else 0
            out = [self.compiled_vit(x[i:i + ENCODER_CHUNK]) for i in range(0, whole, ENCODER_CHUNK)]
            if whole < len(x):
                out.append(self.model.first_stage_model(x[whole:]))
            return torch.cat(out).float().cpu().numpy()  # (N, n_embd)

    def slot_decoder(self, slots: int, frame_num: int, max_new_tokens: int) -> StaticSlotDecoder:
        return StaticSlotDecoder(self, slots, frame_num, max_new_tokens, self.cuda_graphs)


class StaticSlotDecoder:
    """The slot pool's KV cache as static device buffers (see the module docstring); the same
    captions as ``BoundSlotDecoder`` (slot_decoder.py) over the exported graphs."""

    def __init__(self, backend: FastTorchBackend, slots: int, frame_num: int, max_new_tokens: int,
                 cuda_graphs: bool = False):
        cfg, dev = backend.config, backend.device
        self.backend, self.slots, self.frame_num = backend, slots, frame_num
        self.max_len = frame_num + max_new_tokens
        # A row that is not live is fed at its clamped position, a column it will never read; the
        # position table is clamped too, for the rows whose caption ran to the length limit.
        self.max_pos = min(self.max_len, cfg.block_size) - 1
        self.graphs: dict[int, torch.cuda.CUDAGraph] | None = {} if cuda_graphs else None
        self.pool = None  # one memory pool for every bucket's graph: they never run at once
        with torch.inference_mode():
            self.kv = torch.zeros(cfg.n_layer, 2, slots, cfg.n_head, self.max_len, cfg.head_dim,
                                  dtype=backend.dtype, device=dev)  # [layer][key, value]
            self.pos = torch.zeros(slots, dtype=torch.long, device=dev)  # columns each row holds
            self.inputs = torch.zeros(2, slots, dtype=torch.long, device=dev)  # tokens, live: graph inputs
            self.out = torch.zeros(slots, cfg.vocab_size, dtype=torch.float32, device=dev)  # logits
            self.row_ids = torch.arange(slots, device=dev)
            self.cols = torch.arange(self.max_len, device=dev)
        # Host side of the inputs, page-locked so the copy is asynchronous; the event guards the
        # buffer until the copy that reads it has run.
        self.staging = torch.zeros(2, slots, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.copied = torch.cuda.Event() if dev.type == "cuda" else None

    def _rows(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.backend.device)

    @torch.inference_mode()
    def prefill(self, rows: np.ndarray, prefix, source: np.ndarray) -> None:
        backend = self.backend
        x = torch.as_tensor(prefix, dtype=torch.float32, device=backend.device)  # (k, F, E)
        k, n_frames, _ = x.shape
        if n_frames != self.frame_num:
            raise ValueError(f"videos have {n_frames} frames, the first ones had {self.frame_num}")
        with backend.autocast():
            # The model's own forward, no past: plain causal attention over the frames. Its head is
            # left out (fast_decoder), so this is ln_f of the last frame position.
            h, presents = backend.device_decoder(torch.zeros(k, 0, dtype=torch.long, device=x.device),
                                          prefix_embeds=x, last_only=True)
        logits = backend.head_logits(h)  # (k, V)
        r, s = self._rows(rows), self._rows(source)
        kv = torch.stack([torch.stack(pair) for pair in presents])  # (layers, 2, k, nh, F, hs)
        self.kv[:, :, r, :, :n_frames] = kv[:, :, s].to(self.kv.dtype)
        self.pos[r] = n_frames
        self.out[r] = logits[s]

    @torch.inference_mode()
    def step(self, tokens: np.ndarray, live: np.ndarray) -> None:
        active = active_rows(live)
        if active == 0:
            return
        n = bucket(active, self.slots)
        if self.graphs is not None and n not in self.graphs:
            self.graphs[n] = self._capture(n)
        if self.copied is not None:
            self.copied.synchronize()  # the last step's copy has read the staging buffer
        staged = self.staging.numpy()
        staged[0] = np.where(live, tokens, self.backend.config.pad_id)
        staged[1] = live
        self.inputs.copy_(self.staging, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if self.graphs is not None:
            self.graphs[n].replay()
        else:
            self._run(n)

    def _capture(self, n: int) -> torch.cuda.CUDAGraph:
        """The step of rows [0, n) as a CUDA graph, after warm-up runs on a side stream (PyTorch's
        recipe: lazy initialisation and kernel choices must happen before capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._warm_up(n)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the encoder's threads (generator.EncodeAhead) go on launching kernels on
        # their own stream while this thread captures; the default mode would fail their calls.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._run(n)
        if self.pool is None:
            self.pool = graph.pool()
        return graph

    def _warm_up(self, n: int) -> None:
        """Steps of rows [0, n) that leave every caption as it was: with every row marked not live
        they advance no row, and the column each writes at a row's position is written again by
        the real step before anything reads it. Called before the step's inputs are staged."""
        self.inputs[1].zero_()
        for _ in range(2):
            self._run(n)

    def _run(self, n: int) -> None:
        """One token for rows [0, n): reads self.inputs and self.pos, writes the cache, self.out
        and self.pos in place, and allocates nothing that outlives it (what a graph needs)."""
        backend = self.backend
        dec = backend.device_decoder
        tokens, live, pos = self.inputs[0, :n], self.inputs[1, :n], self.pos[:n]
        col = pos.clamp(max=self.max_len - 1)  # (n,) the column each row writes
        with backend.autocast():
            x = dec.tok_emb(tokens) + dec.pos_emb[0][pos.clamp(max=self.max_pos)]  # (n, E)
            visible = (self.cols <= col[:, None])[:, None, None, :]  # (n, 1, 1, L)
            x = x[:, None, :]  # (n, 1, E)
            for i, block in enumerate(dec.blocks):
                x = self._block(i, block, x, col, visible)
            h = dec.ln_f(x[:, 0])
        self.out[:n] = backend.head_logits(h)
        pos += live

    def _block(self, i: int, block: DecoderBlock, x: torch.Tensor, col: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """DecoderBlock's forward for one token per row over the static cache: the block's own
        layers, but the new key and value go into the row's column in place instead of a
        concatenated cache, and attention reads all columns through the mask."""
        attn = block.attn
        n, _, C = x.shape
        h = block.ln1(x)
        q, k, v = (lin(h).view(n, attn.n_head, 1, C // attn.n_head) for lin in (attn.query, attn.key, attn.value))
        keys, values = self.kv[i, 0], self.kv[i, 1]  # (slots, nh, L, hs)
        rows = self.row_ids[:n]
        keys[rows, :, col] = k[:, :, 0].to(keys.dtype)
        values[rows, :, col] = v[:, :, 0].to(values.dtype)
        y = F.scaled_dot_product_attention(q, keys[:n], values[:n], attn_mask=visible)  # (n, nh, 1, hs)
        x = x + attn.proj(y.reshape(n, 1, C))
        return x + block.mlp(block.ln2(x))

    @torch.inference_mode()
    def copy_rows(self, rows: np.ndarray, source_rows: np.ndarray) -> None:
        r, s = self._rows(rows), self._rows(source_rows)
        self.kv[:, :, r] = self.kv[:, :, s]  # the gather on the right is a copy: sources read first
        self.pos[r] = self.pos[s]

    @torch.inference_mode()
    def logits(self, rows: np.ndarray) -> np.ndarray:
        return self.out[self._rows(rows)].cpu().numpy()

    @torch.inference_mode()
    def argmax(self, rows: np.ndarray) -> np.ndarray:
        return self.out[self._rows(rows)].argmax(dim=-1).cpu().numpy()
