"""``manifest.json`` of an export directory: everything the runtime needs besides the graphs.

Written by `v2t export`, read by the runtime; the runtime never looks at a checkpoint's files.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from .contract import DECODER_FILE, ENCODER_FILE, MANIFEST_FILE, decoder_contract, encoder_contract
from ..errors import ArtifactError, ConfigError
from ..inputs.preprocess import CLIP_MEAN, CLIP_STD

FORMAT = "v2t-onnx"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    opset: int
    precision: str = "fp32"
    encoder_file: str = ENCODER_FILE
    decoder_file: str = DECODER_FILE
    tokenizer_file: str = TOKENIZER_FILE
    validation: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "precision": self.precision,
            "opset": self.opset,
            "source_checkpoint": self.source,
            "model_config": cfg.to_dict(),
            "graphs": {
                contract.name: {"file": file, **contract.to_dict()}
                for contract, file in ((encoder_contract(cfg), self.encoder_file),
                                       (decoder_contract(cfg), self.decoder_file))
            },
            "preprocessing": {
                "img_size": cfg.img_size, "frame_num": cfg.frame_num,
                "resize": "shorter side to img_size, bicubic", "crop": "center img_size",
                "color": "RGB", "scale": 1 / 255, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            },
            "special_tokens": {"pad_id": cfg.pad_id, "end_id": cfg.pad_id},
            "generation": {"max_new_tokens": cfg.text_len},
            "tokenizer": self.tokenizer_file,
            "validation": self.validation,
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"{path} not found: {directory} is not a v2t export directory "
                                "(make one with `v2t export`)") from None
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{path}: unsupported format {data.get('format')!r} "
                                f"version {data.get('format_version')!r}; re-export with this v2t")
        try:
            config = ModelConfig.from_dict(data["model_config"])
            graphs = data["graphs"]
            for contract in (encoder_contract(config), decoder_contract(config)):
                declared = {k: graphs[contract.name][k] for k in ("inputs", "outputs")}
                if declared != contract.to_dict():
                    raise ArtifactError(f"{path}: the {contract.name} graph's declared inputs and outputs "
                                        "differ from this v2t's contract; re-export with this v2t")
            manifest = cls(config=config, opset=data["opset"], precision=data.get("precision", "fp32"),
                           encoder_file=graphs["frame_encoder"]["file"], decoder_file=graphs["decoder"]["file"],
                           tokenizer_file=data["tokenizer"], validation=data.get("validation", {}),
                           source=data.get("source_checkpoint", ""))
        except KeyError as err:
            raise ArtifactError(f"{path} lacks the entry {err}; re-export with this v2t") from None
        except ConfigError as err:
            raise ArtifactError(f"{path}: {err}") from None
        for name in (manifest.encoder_file, manifest.decoder_file, manifest.tokenizer_file):
            if not (directory / name).is_file():
                raise ArtifactError(f"{directory / name} is missing (listed in {path})")
        return manifest


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()
