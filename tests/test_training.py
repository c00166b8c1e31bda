"""Training: data loading, checkpoints, resume, finetuning, CLIP weights, parameter checks, DDP.

Every model here is tiny and every table synthetic, so the whole file runs in well under a minute
on two CPU cores (the torchrun test dominates)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from v2t_engine.config import ModelConfig  # noqa: E402
from v2t_engine.errors import ArtifactError, ConfigError  # noqa: E402
from v2t_engine.jobs.synth import write_dataset  # noqa: E402
from v2t_engine.inputs.tables import InputSchema  # noqa: E402
from v2t_engine.tokenizer import CaptionTokenizer  # noqa: E402
from v2t_training import checkpoint as ckpt  # noqa: E402
from v2t_training.data import CaptionDataset, DataSpec  # noqa: E402
from v2t_training.model import VideoCaptioner  # noqa: E402
from v2t_training.optim import param_groups  # noqa: E402
from v2t_training.options import TrainOptions  # noqa: E402
from v2t_training.train import train  # noqa: E402

SCHEMA = "idx:str:1,imgbase64:str:1,text:str:1"
PARAMS = {"frame_num": "2", "img_size": "32", "text_len": "16", "n_layer": "1", "n_head": "2", "n_embd": "32",
          "vit_width": "32", "vit_layers": "1", "vit_heads": "2", "vit_patch_size": "16"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tdata"), n_train=96, n_val=16, n_test=8, frames=3, seed=5)


def options(data, out, **kw) -> TrainOptions:
    base = dict(tables=(str(data["train"]), str(data["val"])), checkpoint_dir=str(out), input_schema=SCHEMA,
                user_defined_parameters=PARAMS, learning_rate=3e-3, epoch_num=2, micro_batch_size=16,
                random_seed=7, progress=False, threads=1)
    return TrainOptions(**{**base, **kw})


def batch(n: int = 3, cfg: ModelConfig | None = None):
    g = torch.Generator().manual_seed(0)
    cfg = cfg or ModelConfig(vocab_size=50, frame_num=2, img_size=32, text_len=8, n_layer=1, n_head=2, n_embd=32,
                             vit_width=32, vit_layers=1, vit_heads=2, vit_patch_size=16)
    return torch.randn(n, cfg.frame_num, 3, cfg.img_size, cfg.img_size, generator=g)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ck"
    return train(options(data, out, epoch_num=6))


# ---------------------------------------------------------------------------- end to end
def test_training_lowers_the_loss_and_writes_a_complete_checkpoint(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "training_state.pt",
            "trainer_state.json"} <= names
    assert not [p for p in trained.parent.iterdir() if ".tmp-" in p.name]  # no temporary leftovers
    state = json.loads((trained / "trainer_state.json").read_text())
    losses = [h["val_loss"] for h in state["history"]]
    assert state["step"] == state["total_steps"] == 36 and len(losses) == 6
    assert losses[-1] < 0.6 * losses[0]
    train_losses = [h["train_loss"] for h in state["history"]]  # beside each validation loss
    assert train_losses[-1] < train_losses[0]
    full = ckpt.load_training_state(trained)  # weights_only=True must accept everything we store
    assert full["step"] == 36 and full["options"]["epoch_num"] == 6


def test_frame_encoder_learns_at_its_scaled_rate():
    model = VideoCaptioner(ModelConfig(vocab_size=20, frame_num=2, img_size=32, text_len=4, n_layer=1, n_head=2,
                                       n_embd=32, vit_width=32, vit_layers=1, vit_heads=2, vit_patch_size=16))
    groups = param_groups(model, 0.01, 1e-3, encoder_lr_scale=0.3)
    encoder = {id(p) for p in model.first_stage_model.parameters()}
    for g in groups:
        in_encoder = {id(p) in encoder for p in g["params"]}
        assert len(in_encoder) == 1  # no group mixes encoder and decoder parameters
        assert g["lr"] == pytest.approx(3e-4 if in_encoder == {True} else 1e-3)
        assert not g["muon"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        TrainOptions(tables=("t.txt",), checkpoint_dir="ck", encoder_lr_scale=0.0)
    assert TrainOptions(tables=("t.txt",), checkpoint_dir="ck").resolved_encoder_lr_scale == 1.0  # Muon
    assert TrainOptions(tables=("t.txt",), checkpoint_dir="ck", optimizer="adamw").resolved_encoder_lr_scale == 0.3
    with pytest.raises(ConfigError, match="optimizer must be one of muon, adamw"):
        TrainOptions(tables=("t.txt",), checkpoint_dir="ck", optimizer="sgd")


def test_checkpoint_reloads_to_identical_outputs(trained, tmp_path):
    model, tok = ckpt.load_model(trained)
    frames = batch(cfg=model.cfg)
    ckpt.save_checkpoint(tmp_path / "copy", model, tok)  # a model-only checkpoint
    again, tok2 = ckpt.load_model(tmp_path / "copy")
    assert same_weights(model, again) and tok2.vocab_size == tok.vocab_size
    assert torch.equal(model.generate_greedy(frames), again.generate_greedy(frames))
    assert not (tmp_path / "copy" / "training_state.pt").exists()


def test_load_model_names_missing_files(trained, tmp_path):
    for name in ("model.safetensors", "config.json"):
        broken = tmp_path / name
        broken.mkdir()
        for p in trained.iterdir():
            if p.name != name:
                (broken / p.name).write_bytes(p.read_bytes())
        with pytest.raises(ArtifactError, match=name):
            ckpt.load_model(broken)


# ---------------------------------------------------------------------------- resume
def test_resume_matches_an_uninterrupted_run(data, tmp_path, monkeypatch):
    # Constant LR, so the two runs' schedules agree whatever total step count each one sees.
    kw = dict(warmup_ratio=0.0, min_lr_ratio=1.0, save_checkpoint_steps=4, epoch_num=2)
    full = train(options(data, tmp_path / "full", **kw))

    real_save, saves = ckpt.save_checkpoint, []

    def save_then_crash(*args, **kwargs):  # dies right after the first save, mid-epoch (step 4 of 6)
        real_save(*args, **kwargs)
        saves.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(options(data, tmp_path / "cut", **kw))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["step"] == 4

    train(options(data, tmp_path / "cut", resume=True, **kw))
    assert json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["step"] == 12
    a, _ = ckpt.load_model(full)
    b, _ = ckpt.load_model(tmp_path / "cut")
    assert same_weights(a, b)


def test_resume_without_a_training_state_is_an_error(data, tmp_path):
    with pytest.raises(ArtifactError, match="resume"):
        train(options(data, tmp_path / "none", resume=True))


# ---------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("extra, message", [
    ({"img_len": "5"}, "img_len=5"),
    ({"block_size": "99"}, "block_size=99"),
    ({"fram_num": "4"}, "unknown key"),
    ({"vit_ckpt_path": "ViT-L/14"}, "does not download"),
    ({"pretrain_model_name_or_path": "bert-base-chinese"}, "never downloads"),
])
def test_inconsistent_user_parameters_are_config_errors(data, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(options(data, tmp_path / "x", user_defined_parameters={**PARAMS, **extra}))


def test_consistent_derived_parameters_are_accepted(data, tmp_path):
    # img_len = (32/16)^2 = 4, block_size = 4 + 16: EasyNLP users pass both.
    out = train(options(data, tmp_path / "ok", epoch_num=1, sequence_length=20,
                        user_defined_parameters={**PARAMS, "img_len": "4", "block_size": "20"}))
    assert ModelConfig.load(out).block_size == 20
    with pytest.raises(ConfigError, match="sequence_length=288"):
        train(options(data, tmp_path / "bad", sequence_length=288))


def test_cli_options_carry_the_train_options_defaults(monkeypatch, tmp_path):
    import v2t_training.train
    from v2t_engine.cli import main

    seen = []
    monkeypatch.setattr(v2t_training.train, "train", lambda opts: seen.append(opts) or tmp_path)
    result = CliRunner().invoke(main, ["train", "--tables", "a.txt,b.txt", "--checkpoint-dir", str(tmp_path),
                                       "--epoch_num", "5", "--resume", "--augment-views", "2"])
    assert result.exit_code == 0, result.output
    assert seen == [TrainOptions(tables=("a.txt", "b.txt"), checkpoint_dir=str(tmp_path), epoch_num=5, resume=True,
                                 augment_views=2)]
    help_text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "[default: 5e-05; x>0]" in help_text and "1.0 with muon, 0.3 with adamw" in help_text


def test_cli_reports_domain_errors_cleanly(data, tmp_path):
    from v2t_engine.cli import main

    params = " ".join(f"{k}={v}" for k, v in {**PARAMS, "img_len": "7"}.items())
    result = CliRunner().invoke(main, ["train", "--tables", f"{data['train']},{data['val']}", "--checkpoint_dir",
                                       str(tmp_path / "ck"), "--input-schema", SCHEMA,
                                       "--user_defined_parameters", params])
    assert result.exit_code == 1 and "img_len=7" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------- finetune
def test_finetune_keeps_architecture_tokenizer_and_frozen_vit(trained, data, tmp_path):
    base, base_tok = ckpt.load_model(trained)
    params = {"pretrain_model_name_or_path": str(trained), "frame_num": "2"}
    out = train(options(data, tmp_path / "ft", epoch_num=1, user_defined_parameters=params))
    tuned, tok = ckpt.load_model(out)
    assert tuned.cfg == base.cfg.replace(freeze_vit=True) and tok.vocab_size == base_tok.vocab_size
    assert same_weights(tuned.first_stage_model, base.first_stage_model)  # frozen by default
    assert not same_weights(tuned.transformer, base.transformer)
    with pytest.raises(ConfigError, match="n_layer=3"):
        train(options(data, tmp_path / "ft2", user_defined_parameters={**params, "n_layer": "3"}))


def test_bert_vocabulary_directory_gives_the_tokenizer(data, tmp_path):
    vocab = tmp_path / "bert"
    vocab.mkdir()
    chars = sorted({c for line in Path(data["train"]).read_text(encoding="utf-8").splitlines()
                    for c in line.split("\t")[2]})
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n",
                                     encoding="utf-8")
    out = train(options(data, tmp_path / "b", epoch_num=1,
                        user_defined_parameters={**PARAMS, "pretrain_model_name_or_path": str(vocab)}))
    assert ModelConfig.load(out).vocab_size == 5 + len(chars)


# ---------------------------------------------------------------------------- Hugging Face CLIP
@pytest.mark.parametrize("n_embd", [16, 32])  # 16: through visual_projection; 32 == width: dropped
def test_hf_clip_directory_loads_into_the_frame_encoder(tmp_path, n_embd):
    transformers = pytest.importorskip("transformers")
    from v2t_training.clip_weights import load_clip_vision, read_clip_vision_spec

    hf_cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16,
                                           hidden_act="quick_gelu", layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModelWithProjection(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "clip")
    spec = read_clip_vision_spec(tmp_path / "clip")
    cfg = ModelConfig(vocab_size=10, n_embd=n_embd, n_head=4, n_layer=1, frame_num=2, text_len=4,
                      **spec.config_fields())
    ours = VideoCaptioner(cfg).first_stage_model.eval()
    load_clip_vision(ours, tmp_path / "clip", n_embd, cfg.vit_layers)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=pixels)
        want = out.image_embeds if n_embd == 16 else hf.vision_model.post_layernorm(out.last_hidden_state[:, 0])
        torch.testing.assert_close(ours(pixels), want, atol=1e-5, rtol=1e-5)


def test_frame_encoder_computes_the_last_blocks_class_token_alone():
    """The last block gives the class token only (all that is read of it), the same embeddings as
    the whole block, with less work."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, frame_num=2, text_len=4, img_size=32,
                      vit_width=32, vit_layers=2, vit_heads=4, vit_patch_size=8)
    torch.manual_seed(0)
    vit = VideoCaptioner(cfg).first_stage_model.eval()
    pixels = torch.randn(3, 3, 32, 32)
    flops = {}
    with torch.no_grad():
        for every in (False, True):
            with FlopCounterMode(display=False) as counter:
                out = vit(pixels, every_token=every)
            flops[every] = (counter.get_total_flops(), out)
    torch.testing.assert_close(flops[False][1], flops[True][1], atol=1e-5, rtol=1e-5)
    assert flops[False][0] < 0.75 * flops[True][0]  # of two blocks, the second costs about 1/4 of itself


def test_hf_clip_projection_mismatch_is_a_config_error(tmp_path):
    transformers = pytest.importorskip("transformers")
    from v2t_training.clip_weights import load_clip_vision

    hf_cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(hf_cfg).save_pretrained(tmp_path / "clip")
    cfg = ModelConfig(vocab_size=10, n_embd=24, n_head=4, n_layer=1, frame_num=2, img_size=32, vit_width=32,
                      vit_layers=1, vit_heads=4, vit_patch_size=8)
    with pytest.raises(ConfigError, match="projection_dim"):
        load_clip_vision(VideoCaptioner(cfg).first_stage_model, tmp_path / "clip", 24, 1)


# ---------------------------------------------------------------------------- data
def test_lazy_decoding_matches_the_cache_and_bad_rows_are_skipped(data, tmp_path, caplog):
    lines = Path(data["train"]).read_text(encoding="utf-8").splitlines()[:6]
    idx, frames, text = lines[1].split("\t")
    one_frame = json.dumps(json.loads(frames)[:1])
    rows = [lines[0], "broken\t[\"!!!\"]\tx", lines[2], "short_row", f"{idx}_1f\t{one_frame}\t{text}", *lines[3:]]
    table = tmp_path / "mixed.txt"
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    schema = InputSchema.parse(SCHEMA)
    spec = DataSpec("imgbase64", "text", frame_num=2, img_size=32, text_len=16)
    tok = CaptionTokenizer.train([r.split("\t")[-1] for r in rows])
    with caplog.at_level(logging.WARNING):
        cached = CaptionDataset(table, schema, spec, tok)
    assert cached.cached and len(cached) == 6 and cached.padded_rows == 1
    assert "skipped 2 bad rows (lines 2, 4)" in caplog.text
    lazy = CaptionDataset(table, schema, spec, tok, cache_budget_bytes=0)
    assert not lazy.cached and len(lazy) == 7  # the undecodable row is only found when read
    f_lazy, t_lazy = lazy.__getitems__([0, 1, 6])  # row 1 is bad: replaced by the next good row
    f_cached, t_cached = cached.__getitems__([0, 1, 5])
    assert f_lazy.dtype == torch.float32 and f_lazy.shape == (3, 2, 3, 32, 32)
    assert torch.equal(t_lazy, t_cached) and torch.equal(f_lazy, f_cached)
    frames0, tokens0 = cached[0]
    assert torch.equal(frames0, f_cached[0]) and tokens0.dtype == torch.int64 and tokens0.shape == (16,)


# ---------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_two_processes_write_one_checkpoint(data, tmp_path):
    out = tmp_path / "ddp"
    params = " ".join(f"{k}={v}" for k, v in PARAMS.items())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "v2t_engine.cli", "train", "--tables", f"{data['train']},{data['val']}", "--checkpoint_dir", str(out),
         "--input_schema", SCHEMA, "--micro_batch_size", "16", "--epoch_num", "2", "--learning_rate", "3e-3",
         "--user_defined_parameters", params, "--threads", "1"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 6  # 96 rows / (2 ranks x 16) = 3 steps per epoch
    assert len(state["history"]) == 2 and state["history"][-1]["val_loss"] < state["history"][0]["val_loss"]
    ckpt.load_model(out)


@pytest.mark.slow
def test_a_seed_trains_the_same_weights_on_two_threads(data, tmp_path):
    """On several threads some backward kernels sum in thread order; training on the CPU uses
    PyTorch's deterministic ones, so a seed's weights are the same bit for bit."""
    from conftest import TINY_ARCH

    kw = dict(threads=2, epoch_num=1, micro_batch_size=32, user_defined_parameters={k: str(v) for k, v in TINY_ARCH.items()})
    a, _ = ckpt.load_model(train(options(data, tmp_path / "a", **kw)))
    b, _ = ckpt.load_model(train(options(data, tmp_path / "b", **kw)))
    assert same_weights(a, b)
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is restored
