"""OpenAI CLIP .pt files (TorchScript archives) as vit_ckpt_path: their weights are read without
running the archive, into the frame encoder, with the ViT's shape read off the weights."""
import copy
import io
import pickle
import zipfile

import pytest

torch = pytest.importorskip("torch")

from v2t_engine.config import ModelConfig  # noqa: E402
from v2t_engine.errors import ArtifactError  # noqa: E402
from v2t_training.clip_weights import load_clip_vision, read_clip_vision_spec  # noqa: E402
from v2t_training.model import VisionTransformer  # noqa: E402
from v2t_training.openai_clip import read_torchscript_weights  # noqa: E402


class OpenAIClip(torch.nn.Module):
    """OpenAI's CLIP as TorchScript saves it: the ViT under `visual`, text weights beside it."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.token_embedding = torch.nn.Embedding(10, 8)
        self.logit_scale = torch.nn.Parameter(torch.ones([]))

    def forward(self, frames):
        return self.visual(frames) * self.logit_scale


def clip_archive(path, width=64, proj_dim=32, dtype=torch.float16):
    """A traced OpenAI-layout CLIP saved as TorchScript (OpenAI ships fp16 weights)."""
    cfg = ModelConfig(vocab_size=10, img_size=32, n_embd=proj_dim, n_head=4, vit_width=width, vit_layers=2,
                      vit_heads=width // 64, vit_patch_size=16)
    torch.manual_seed(0)
    visual = VisionTransformer(cfg).eval()
    with torch.no_grad():
        for p in visual.parameters():
            p.copy_(p.to(dtype).float())  # what the fp16 archive holds, exactly
    traced = torch.jit.trace(OpenAIClip(copy.deepcopy(visual)).eval(), torch.randn(1, 3, 32, 32))
    traced.to(dtype).save(str(path))  # the storages as OpenAI ships them
    return visual


def test_openai_clip_archive_loads_into_the_frame_encoder(tmp_path):
    source = clip_archive(tmp_path / "ViT-T-16.pt")
    spec = read_clip_vision_spec(tmp_path / "ViT-T-16.pt")
    assert (spec.vit_width, spec.vit_layers, spec.vit_heads, spec.vit_patch_size, spec.img_size) == (64, 2, 1, 16, 32)
    cfg = ModelConfig(vocab_size=10, img_size=32, n_embd=32, n_head=4, **{k: v for k, v in spec.config_fields().items()
                                                                if k != "img_size"})
    encoder = VisionTransformer(cfg).eval()
    load_clip_vision(encoder, tmp_path / "ViT-T-16.pt", n_embd=32, layers=2)
    frames = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(frames), source(frames), atol=1e-5)


def test_projection_is_dropped_when_n_embd_is_the_width(tmp_path):
    clip_archive(tmp_path / "clip.pt")
    spec = read_clip_vision_spec(tmp_path / "clip.pt")
    cfg = ModelConfig(vocab_size=10, img_size=32, n_embd=64, n_head=4, **{k: v for k, v in spec.config_fields().items()
                                                                if k != "img_size"})
    encoder = VisionTransformer(cfg)
    load_clip_vision(encoder, tmp_path / "clip.pt", n_embd=64, layers=2)  # EasyNLP drops proj here
    with pytest.raises(Exception, match="n_embd=48 matches neither"):
        load_clip_vision(encoder, tmp_path / "clip.pt", n_embd=48, layers=2)


def test_archives_are_read_without_running_their_code(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (print, ("this would run",))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"weight": RunsCode()}, protocol=2))
    with pytest.raises(ArtifactError, match="refused __builtin__.print"):
        read_torchscript_weights(evil)
    (tmp_path / "cut.pt").write_bytes(io.BytesIO(b"PK\x03\x04 truncated").getvalue())
    with pytest.raises(ArtifactError, match="cannot read the weights"):
        read_torchscript_weights(tmp_path / "cut.pt")
    with pytest.raises(Exception, match="neither an OpenAI CLIP .pt file nor a Hugging Face"):
        read_clip_vision_spec(tmp_path / "ViT-L/14")
