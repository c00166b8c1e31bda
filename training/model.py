"""The video captioner: an OpenAI-CLIP ViT frame encoder and a minGPT caption decoder.

Module and parameter names follow EasyNLP's ``mingpt_i2t`` application exactly
(``first_stage_model.`` + OpenAI CLIP visual keys, ``transformer.`` + minGPT keys; EASYNLP.md §8)
so an EasyNLP checkpoint's state dict maps onto this model weight for weight.

The decoder's one forward takes and returns an explicit KV cache. Training (no past), greedy
generation and the ONNX export all go through it, so there is a single definition of the math.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from v2t_engine.config import ModelConfig

# One (key, value) pair per decoder layer, each (B, nh, S, hs).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]

# minGPT's initialisation std for every decoder weight and embedding.
DECODER_INIT_STD = 0.02


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ViTAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (``in_proj_weight``
    stacks q, k, v) so OpenAI CLIP weights load as they are, computed with SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
        qkv = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    def first_token(self, x: torch.Tensor) -> torch.Tensor:
        """`forward`'s output at the first token only (B, 1, C): its query against every token's
        key and value. The projection still makes every token's query, in the same one matmul:
        slicing the stacked weight instead would leave a Slice on it in the exported graph, where
        int8 quantization no longer sees a weight."""
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
        qkv = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        y = F.scaled_dot_product_attention(qkv[0][:, :, :1], qkv[1], qkv[2])  # (B, nh, 1, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, 1, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: str, eps: float):
        super().__init__()
        self.attn = ViTAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def first_token(self, x: torch.Tensor) -> torch.Tensor:
        """`forward`'s output at the first token only (B, 1, C)."""
        x = x[:, :1] + self.attn.first_token(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) 2-D sine-cosine position table for row-major patches: a quarter of the
    channels holds sin(row * f), a quarter cos(row * f), then the same for the column, at
    geometric frequencies f from 1 down to 1/10000 (the table MAE's ViTs use)."""
    quarter = width // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter)))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freq  # (grid*grid, quarter)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.zeros(grid * grid, width, dtype=torch.float64)
    table[:, :4 * quarter] = torch.cat([encode(rows), encode(cols)], dim=1)
    return table.float()


class VisionTransformer(nn.Module):
    """OpenAI CLIP's VisionTransformer; per frame it returns ``ln_post(x[:, 0]) @ proj``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width, patch = cfg.vit_width, cfg.vit_patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.img_len + 1, width))
        # Built from scratch, the encoder starts with a sin-cos table for its patch positions
        # instead of noise. Motion captions need each frame's embedding to say where the object
        # is; with random position vectors the model must first discover that patch (r, c) lies
        # next to (r, c+1), and after training the frame embeddings told the object's position
        # far less well (measured: README, "Training defaults").
        # The table stays a learned parameter; loaded CLIP weights replace it.
        with torch.no_grad():
            self.positional_embedding[1:] = sincos_2d(cfg.img_size // patch, width)
        self.ln_pre = nn.LayerNorm(width, eps=cfg.vit_layer_norm_eps)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, cfg.vit_heads, cfg.vit_act, cfg.vit_layer_norm_eps)
            for _ in range(cfg.vit_layers))
        self.ln_post = nn.LayerNorm(width, eps=cfg.vit_layer_norm_eps)
        # EasyNLP drops the projection when the width already matches the decoder.
        self.proj = nn.Parameter(torch.empty(width, cfg.n_embd)) if cfg.vit_has_proj else None
        # Frame embeddings start at the scale of the decoder's token and position embeddings
        # (minGPT's std 0.02) rather than ln_post's ~1 per element. At CLIP's scale the decoder's
        # position embeddings are ~2% of a frame's, so it barely tells the frames apart, and a
        # caption of motion needs their order (what CLIP's scale costs: README, "Training
        # defaults"). Loaded CLIP weights replace it.
        if self.proj is not None:
            nn.init.normal_(self.proj, std=DECODER_INIT_STD / width ** 0.5)  # ln_post output ~N(0, 1)
        else:
            nn.init.constant_(self.ln_post.weight, DECODER_INIT_STD)

    def forward(self, frames: torch.Tensor, every_token: bool = False) -> torch.Tensor:
        """frames (N, 3, S, S) normalized pixels → (N, n_embd) one embedding per frame.

        Only the class token of the last block is read, so that block computes it alone (the
        other tokens still give their keys and values): 3/4 of the block's work, 1/vit_layers of
        the encoder's, the same result. `every_token` computes the whole last block, as CLIP
        and EasyNLP do (the benchmarks' EasyNLP-equivalent baseline)."""
        *blocks, last = self.transformer.resblocks
        x = self.embed(frames)
        for block in blocks:
            x = block(x)
        return self.pool(last(x) if every_token else last.first_token(x))

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, 3, S, S) → the first block's input (N, 1 + g*g, width): class token first."""
        x = self.conv1(frames)  # (N, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, 1+g*g, width)
        return self.ln_pre(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output (N, T, width), T >= 1 → (N, n_embd): its class token."""
        x = self.ln_post(x[:, 0, :])  # (N, width)
        return x @ self.proj if self.proj is not None else x


class DecoderAttention(nn.Module):
    """minGPT's causal self-attention (separate key/query/value/proj Linear layers) with an
    explicit KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None):
        B, T, C = x.shape
        hs = C // self.n_head

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, S, hs), S = past + T
            v = torch.cat([past[1], v], dim=2)
        if mask is None:  # training: no past, plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Written out, not SDPA: the ONNX exporter decomposes SDPA into a Transpose of the
            # whole key cache plus a scaling Mul on it, which ONNX Runtime cannot fold into the
            # MatMul (a large share of an int8 decoder step; measured: README, "Benchmarks").
            # Scaling q instead and multiplying by k^T directly lets ORT run k^T inside the GEMM
            # (FusedMatMul with transB), so the cache is only read.
            att = (q * hs ** -0.5) @ k.transpose(-2, -1)  # (B, nh, T, S)
            att = att.masked_fill(~mask, float("-inf"))  # mask (B, 1, T, S); own column always visible
            y = att.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), (k, v)

    def step_over_cache(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        visible: torch.Tensor):
        """One token per row (x (B, 1, C)) over a fixed-length cache it only reads (keys, values
        (B, nh, L, hs); visible (B, 1, 1, L) marks the columns before the row's position). The
        row's own key is attended separately and returned for the caller to write into the
        cache: an exported graph then never copies the cache, where concatenating the new column
        would. Softmax over [cache scores, own score] is the forward's masked softmax."""
        B, _, C = x.shape
        hs = C // self.n_head
        q, k, v = (lin(x).view(B, 1, self.n_head, hs).transpose(1, 2) for lin in (self.query, self.key, self.value))
        q = q * hs ** -0.5
        cached = (q @ keys.transpose(-2, -1)).masked_fill(~visible, float("-inf"))  # (B, nh, 1, L)
        own = (q * k).sum(-1, keepdim=True)  # (B, nh, 1, 1)
        att = torch.cat([cached, own], dim=-1).softmax(dim=-1)
        y = att[..., :-1] @ values + att[..., -1:] * v  # (B, nh, 1, hs)
        return self.proj(y.transpose(1, 2).reshape(B, 1, C)), (k, v)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.attn = DecoderAttention(cfg)
        # Indices 0 and 2 give minGPT's keys mlp.0 / mlp.2; minGPT uses the exact (erf) GELU.
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x, mask, past):
        a, present = self.attn(self.ln1(x), mask, past)
        x = x + a
        return x + self.mlp(self.ln2(x)), present


class CaptionDecoder(nn.Module):
    """minGPT over ``[prefix embeddings, token embeddings]`` with learned positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=DECODER_INIT_STD)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # minGPT's initialisation.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=DECODER_INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, prefix_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                past: KVCache | None = None, last_only: bool = False):
        """One decoder pass.

        input_ids (B, T) tokens, T may be 0; prefix_embeds (B, P, E) frame embeddings placed before
        the tokens, P may be 0; position_ids (B, P+T) absolute positions; attention_mask (B, S)
        with S = past + P + T, 1 for keys that may be attended (0 marks padding slots);
        past: per layer (key, value) of shape (B, nh, past, hs).
        Without past and attention_mask this is plain causal training attention.
        Returns logits (B, P+T, V), or (B, V) for the last position with ``last_only``, and the
        new cache (past + this step's keys/values).
        """
        x = self.tok_emb(input_ids)  # (B, T, E)
        if prefix_embeds is not None:
            x = torch.cat([prefix_embeds.to(x.dtype), x], dim=1)  # (B, P+T, E)
        B, L, _ = x.shape
        if position_ids is None:
            past_len = past[0][0].shape[2] if past else 0
            position_ids = torch.arange(past_len, past_len + L, device=x.device).expand(B, L)
        x = x + self.pos_emb[0][position_ids]  # (B, L, E)

        mask = None
        if past is not None or attention_mask is not None:
            mask = self._step_mask(attention_mask, past, B, L, x.device)
        presents: KVCache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, mask, past[i] if past else None)
            presents.append(present)
        x = self.ln_f(x)
        if last_only:
            x = x[:, -1, :]  # (B, E)
        return self.head(x), presents

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache):
        """One token per row over a fixed-length cache (contract.py's decode graph): input_ids and
        position_ids (B, 1); cache per layer (keys, values) (B, nh, L, hs) whose column c holds
        position c, of which each row sees the columns before its position. Returns the
        logits (B, V) and each layer's new (key, value) (B, nh, 1, hs), for column position_ids."""
        x = self.tok_emb(input_ids) + self.pos_emb[0][position_ids]  # (B, 1, E)
        L = cache[0][0].shape[2]
        visible = (torch.arange(L, device=x.device)[None, :] < position_ids)[:, None, None, :]  # (B, 1, 1, L)
        new: KVCache = []
        for block, (keys, values) in zip(self.blocks, cache):
            a, kv = block.attn.step_over_cache(block.ln1(x), keys, values, visible)
            x = x + a
            x = x + block.mlp(block.ln2(x))
            new.append(kv)
        return self.head(self.ln_f(x[:, 0])), new

    @staticmethod
    def _step_mask(attention_mask, past, B: int, L: int, device) -> torch.Tensor:
        """Boolean (B, 1, L, S) mask: causal within this step, all of the past visible, keys
        marked 0 in attention_mask hidden."""
        past_len = past[0][0].shape[2] if past else 0
        S = past_len + L
        q_pos = torch.arange(L, device=device).unsqueeze(1) + past_len  # (L, 1)
        k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
        mask = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0)  # (1, 1, L, S)
        if attention_mask is not None:
            mask = mask & attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, L, S)
        return mask.expand(B, 1, L, S)


class VideoCaptioner(nn.Module):
    """The whole application. Attribute names are EasyNLP's (``first_stage_model`` is the CLIP
    ViT, ``transformer`` the minGPT decoder) so their state-dict keys coincide."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.first_stage_model = VisionTransformer(cfg)
        self.transformer = CaptionDecoder(cfg)
        if cfg.freeze_vit:
            self.first_stage_model.requires_grad_(False)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, F, 3, S, S) → prefix embeddings (B, F, E)."""
        B, Fr = frames.shape[:2]
        if self.cfg.freeze_vit:
            with torch.no_grad():  # EasyNLP calls its frozen encoder under no_grad
                emb = self.first_stage_model(frames.flatten(0, 1))
        else:
            emb = self.first_stage_model(frames.flatten(0, 1))
        return emb.view(B, Fr, -1)

    def loss(self, frames: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """EasyNLP's objective (EASYNLP.md §6): input ``[frames, text[:-1]]``, logits from the last
        frame position on, targets all ``text_len`` tokens, pads included."""
        prefix = self.encode_frames(frames)  # (B, F, E)
        logits, _ = self.transformer(tokens[:, :-1], prefix_embeds=prefix)  # (B, F+T-1, V)
        logits = logits[:, prefix.shape[1] - 1:, :]  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))

    @torch.no_grad()
    def generate_greedy(self, frames: torch.Tensor) -> torch.Tensor:
        """Reference greedy decoding with the KV cache: (B, F, 3, S, S) → (B, text_len) token ids,
        padded with pad_id after each caption's end."""
        cfg = self.cfg
        prefix = self.encode_frames(frames)
        B = prefix.shape[0]
        empty = torch.zeros(B, 0, dtype=torch.long, device=prefix.device)
        logits, past = self.transformer(empty, prefix_embeds=prefix, last_only=True)
        out = torch.full((B, cfg.text_len), cfg.pad_id, dtype=torch.long, device=prefix.device)
        done = torch.zeros(B, dtype=torch.bool, device=prefix.device)
        for t in range(cfg.text_len):
            token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, cfg.pad_id), token)
            out[:, t] = token
            done |= token == cfg.pad_id
            if bool(done.all()) or t == cfg.text_len - 1:
                break
            logits, past = self.transformer(token[:, None], past=past, last_only=True)
        return out


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

