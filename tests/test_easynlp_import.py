"""EasyNLP video2text checkpoints: built here in EasyNLP's layout (pytorch_model.bin with the keys of
EASYNLP.md §8, config.json of model_type mingpt_i2t, vocab.txt, train_config.json), loaded through
every entry point that takes a checkpoint, and decoded as EasyNLP decodes: a reference written in
this file from EasyNLP's algorithm and the raw state dict (CLIP ViT + minGPT, the whole sequence
recomputed every step, greedy), independent of v2t's model code."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from conftest import TEST_SCHEMA, run_cli, untrained_model  # noqa: E402
from v2t_engine.config import ModelConfig  # noqa: E402
from v2t_engine.errors import ArtifactError  # noqa: E402
from v2t_engine.inputs.frames import FrameSource, row_frames_or_error  # noqa: E402
from v2t_engine.inputs.preprocess import normalize  # noqa: E402
from v2t_engine.inputs.tables import InputSchema, read_table  # noqa: E402
from v2t_engine.runtime.captioner import Captioner  # noqa: E402
from v2t_engine.tokenizer import SPECIAL_TOKENS  # noqa: E402
from v2t_training.checkpoint import load_model  # noqa: E402

WORDS = [*SPECIAL_TOKENS, *"一个红色绿蓝黄紫的圆形方三角星从左向右上下移动静止", *(f"[unused{i}]" for i in range(1, 4))]


def easynlp_checkpoint(directory, frame_num, text_len, vit_width=64, n_embd=48, train_config=True):
    """An EasyNLP-layout checkpoint of an untrained model (captions end at frame-dependent lengths)."""
    cfg = ModelConfig(vocab_size=len(WORDS), frame_num=frame_num, img_size=32, text_len=text_len, n_layer=2,
                      n_head=4, n_embd=n_embd, vit_width=vit_width, vit_layers=2, vit_heads=vit_width // 64,
                      vit_patch_size=16)
    state = dict(untrained_model(cfg).state_dict())
    block = cfg.block_size
    for i in range(cfg.n_layer):  # minGPT's causal-mask buffers, saved by EasyNLP
        state[f"transformer.blocks.{i}.attn.mask"] = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
    directory.mkdir(parents=True)
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "vocab.txt").write_text("".join(w + "\n" for w in WORDS), encoding="utf-8")
    (directory / "config.json").write_text(json.dumps({
        "model_type": "mingpt_i2t", "vocab_size": len(WORDS), "decode_vocab_size": len(WORDS),
        "block_size": block, "n_layer": 2, "n_head": 4, "n_embd": n_embd, "embd_pdrop": 0.0,
        "resid_pdrop": 0.0, "attn_pdrop": 0.0, "prefix_encoder_type": "vit",
        "prefix_encoder_ckpt_path": "ViT-L/14"}), encoding="utf-8")
    if train_config:
        params = f"frame_num={frame_num} img_size=32 img_len={cfg.img_len} text_len={text_len} n_layer=2"
        (directory / "train_config.json").write_text(json.dumps({"user_defined_parameters": params}))
    return directory, state


# ------------------------------------------------------------------ EasyNLP's model, from the weights
def clip_visual(sd, frames, heads):
    """OpenAI CLIP's VisionTransformer: ln_post(CLS) @ proj (proj absent when width == n_embd)."""
    p = "first_stage_model."
    x = F.conv2d(frames, sd[p + "conv1.weight"], stride=sd[p + "conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)  # (N, grid^2, width)
    cls = sd[p + "class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd[p + "positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd[p + "ln_pre.weight"], sd[p + "ln_pre.bias"])
    i = 0
    while f"{p}transformer.resblocks.{i}.ln_1.weight" in sd:
        b = f"{p}transformer.resblocks.{i}."
        h = F.layer_norm(x, x.shape[-1:], sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        q, k, v = F.linear(h, sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"]).chunk(3, -1)
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads), -1)
        h = (att @ split(v)).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(h, sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        h = F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        i += 1
    x = F.layer_norm(x[:, 0], x.shape[-1:], sd[p + "ln_post.weight"], sd[p + "ln_post.bias"])
    return x @ sd[p + "proj"] if p + "proj" in sd else x


def mingpt_logits(sd, tokens, prefix, n_head):
    """minGPT over [frames, tokens], positions from 0 at the first frame; logits at every position."""
    p = "transformer."
    x = torch.cat([prefix, F.embedding(tokens, sd[p + "tok_emb.weight"])], 1)
    T = x.shape[1]
    x = x + sd[p + "pos_emb"][:, :T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    i = 0
    while f"{p}blocks.{i}.ln1.weight" in sd:
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, x.shape[-1:], sd[b + "ln1.weight"], sd[b + "ln1.bias"])
        split = lambda t: t.view(t.shape[0], T, n_head, -1).transpose(1, 2)  # noqa: E731
        q, k, v = (split(F.linear(h, sd[b + f"attn.{n}.weight"], sd[b + f"attn.{n}.bias"]))
                   for n in ("query", "key", "value"))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(k.shape[-1])
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), -1)
        h = (att @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], sd[b + "ln2.weight"], sd[b + "ln2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.0.weight"], sd[b + "mlp.0.bias"])),
                         sd[b + "mlp.2.weight"], sd[b + "mlp.2.bias"])
        i += 1
    x = F.layer_norm(x, x.shape[-1:], sd[p + "ln_f.weight"], sd[p + "ln_f.bias"])
    return F.linear(x, sd[p + "head.weight"])


@torch.no_grad()
def easynlp_greedy(sd, pixels, text_len, vit_heads, n_head, pad_id):
    """EasyNLP's generate with top_k=1: the whole sequence recomputed each step, text_len steps at
    most; each caption cut at its first [PAD]."""
    B, Fr = pixels.shape[:2]
    prefix = clip_visual(sd, pixels.reshape(B * Fr, *pixels.shape[2:]), vit_heads).view(B, Fr, -1)
    tokens = torch.zeros(B, 0, dtype=torch.long)
    for _ in range(text_len):
        logits = mingpt_logits(sd, tokens, prefix, n_head)[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
        if (tokens == pad_id).any(1).all():
            break
    out = np.full((B, text_len), pad_id, np.int64)
    for row, ids in zip(out, tokens.tolist()):
        ids = ids[:ids.index(pad_id)] if pad_id in ids else ids
        row[:len(ids)] = ids
    return out


def test_clip_and_mingpt_reference_is_v2ts_model():
    """The reference above is a faithful second implementation: on one model both forwards agree."""
    cfg = ModelConfig(vocab_size=len(WORDS), frame_num=2, img_size=32, text_len=4, n_layer=2, n_head=4,
                      n_embd=48, vit_width=64, vit_layers=2, vit_heads=1, vit_patch_size=16)
    model = untrained_model(cfg)
    sd = model.state_dict()
    frames = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(clip_visual(sd, frames, 1), model.first_stage_model(frames), atol=1e-4)


# ------------------------------------------------------------------ loading and captions
def clips(synth_data, frame_num, n=10):
    rows = list(read_table(synth_data["test"], InputSchema.parse(TEST_SCHEMA)))[:n]
    return np.stack([row_frames_or_error(r, "imgbase64", frame_num, 32, FrameSource())[0] for r in rows])


@pytest.mark.parametrize("frame_num, text_len, through_onnx", [
    (2, 6, False), (3, 16, False),
    pytest.param(4, 10, True, marks=pytest.mark.slow),  # + v2t export and ONNX Runtime
])
def test_easynlp_checkpoint_gives_easynlp_greedy_captions(synth_data, tmp_path, frame_num, text_len, through_onnx):
    ck, state = easynlp_checkpoint(tmp_path / "easynlp", frame_num, text_len)
    model, tokenizer = load_model(ck)
    cfg = model.cfg
    assert (cfg.frame_num, cfg.text_len, cfg.img_size, cfg.vit_width, cfg.vit_heads, cfg.vit_patch_size) == \
        (frame_num, text_len, 32, 64, 1, 16)
    assert cfg.block_size == state["transformer.pos_emb"].shape[1] and tokenizer.pad_id == 0
    pixels = clips(synth_data, frame_num)
    want = easynlp_greedy(state, torch.from_numpy(normalize(pixels)), text_len, cfg.vit_heads, cfg.n_head,
                          tokenizer.pad_id)
    assert len({tuple(r) for r in want}) > 1  # captions differ from clip to clip
    got = Captioner.load(ck).generate_ids(pixels)[:, 0]  # the torch backend, chosen by the directory
    assert np.array_equal(got, want)
    if not through_onnx:
        return
    export = tmp_path / "onnx"
    run_cli(["export", "--checkpoint_dir", ck, "--output", export])
    assert np.array_equal(Captioner.load(export).generate_ids(pixels)[:, 0], want)


@pytest.mark.slow
def test_predict_and_finetune_take_an_easynlp_directory(synth_data, tmp_path):
    ck, _ = easynlp_checkpoint(tmp_path / "easynlp", frame_num=2, text_len=8)
    table_args = ["--tables", synth_data["test"], "--input_schema", TEST_SCHEMA]
    run_cli(["predict", *table_args, "--outputs", tmp_path / "torch.txt", "--checkpoint_dir", ck])
    run_cli(["export", "--checkpoint_dir", ck, "--output", tmp_path / "onnx"])
    run_cli(["predict", *table_args, "--outputs", tmp_path / "ort.txt", "--checkpoint_dir", tmp_path / "onnx"])
    assert (tmp_path / "torch.txt").read_text(encoding="utf-8") == (tmp_path / "ort.txt").read_text(encoding="utf-8")

    run_cli(["train", "--tables", f"{synth_data['train']},{synth_data['val']}", "--checkpoint_dir", tmp_path / "ft",
             "--epoch_num", 1, "--micro_batch_size", 16, "--threads", 1,
             "--user_defined_parameters", f"pretrain_model_name_or_path={ck}"])
    tuned, _ = load_model(tmp_path / "ft")
    assert tuned.cfg.frame_num == 2 and tuned.cfg.vit_width == 64 and tuned.cfg.freeze_vit


def test_text_len_and_frame_num_come_from_the_run_or_easynlps_defaults(tmp_path):
    ck, _ = easynlp_checkpoint(tmp_path / "a", frame_num=4, text_len=10, train_config=False)
    model, _ = load_model(ck)
    assert model.cfg.frame_num == 3 and model.cfg.text_len == 10  # EasyNLP's default; block_size - img_len
    ck, _ = easynlp_checkpoint(tmp_path / "b", frame_num=2, text_len=10, vit_width=64, n_embd=64)
    assert not load_model(ck)[0].cfg.vit_has_proj  # width == n_embd: EasyNLP drops CLIP's proj


def test_bad_easynlp_checkpoints_are_one_line_errors(tmp_path):
    def broken(name, change):
        ck, state = easynlp_checkpoint(tmp_path / name, frame_num=2, text_len=6)
        change(ck, state)
        with pytest.raises(ArtifactError) as err:
            load_model(ck)
        return str(err.value)

    class NeedsCode:
        def __reduce__(self):
            return (print, ("this would run",))

    assert "need code to load" in broken("pickle", lambda ck, s: torch.save({**s, "x": NeedsCode()},
                                                                             ck / "pytorch_model.bin"))
    truncate = lambda ck, s: (ck / "pytorch_model.bin").write_bytes((ck / "pytorch_model.bin").read_bytes()[:5000])  # noqa: E731
    assert "cannot be read" in broken("truncated", truncate)

    other = broken("bert", lambda ck, s: (ck / "config.json").write_text(json.dumps({"model_type": "bert"})))
    assert "has model_type 'bert'" in other
    vocab = lambda ck, s: (ck / "vocab.txt").write_text("".join(w + "\n" for w in WORDS[:-2]), encoding="utf-8")  # noqa: E731
    assert f"has {len(WORDS) - 2} tokens but the model's vocabulary" in broken("vocab", vocab)
    missing = broken("missing", lambda ck, s: torch.save({k: v for k, v in s.items() if "ln_f" not in k},
                                                          ck / "pytorch_model.bin"))
    assert "missing 2 key(s): transformer.ln_f.weight, transformer.ln_f.bias" in missing
    extra = broken("extra", lambda ck, s: torch.save({**s, "transformer.extra": torch.zeros(1)},
                                                      ck / "pytorch_model.bin"))
    assert "unexpected 1 key(s): transformer.extra" in extra
    shape = broken("shape", lambda ck, s: torch.save({**s, "transformer.ln_f.bias": torch.zeros(7)},
                                                      ck / "pytorch_model.bin"))
    assert "transformer.ln_f.bias has shape (7,) in the checkpoint, (48,) in the model" in shape
    vit = broken("vit", lambda ck, s: torch.save({k: v for k, v in s.items() if "conv1" not in k},
                                                  ck / "pytorch_model.bin"))
    assert "not an OpenAI CLIP ViT" in vit
    for message in (missing, extra, shape, vit, other):
        assert "\n" not in message
