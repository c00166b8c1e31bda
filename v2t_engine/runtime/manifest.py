"""``manifest.json`` of an export directory: everything the runtime needs besides the graphs.

Written by `v2t export`, read by the runtime; the runtime never looks at a checkpoint's files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from .contract import DECODE_FILE, ENCODER_FILE, MANIFEST_FILE, PREFILL_FILE, graph_contracts
from ..errors import ArtifactError, ConfigError
from ..inputs.preprocess import CLIP_MEAN, CLIP_STD
from .tensorrt import MANIFEST_KEY, TensorRTBlock, file_sha256, rebuild_command

FORMAT = "v2t-onnx"
# 2: the prefill/decode pair over a fixed-length KV buffer, and uint8 frames into the encoder.
FORMAT_VERSION = 2
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    opset: int
    precision: str = "fp32"
    # graph name (contract.GraphContract.name) → its file in the directory
    graph_files: dict[str, str] = field(default_factory=lambda: {
        "frame_encoder": ENCODER_FILE, "prefill": PREFILL_FILE, "decode": DECODE_FILE})
    tokenizer_file: str = TOKENIZER_FILE
    validation: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    # name → {"bytes": size, "sha256": hex digest} of every file the runtime reads: sizes are
    # checked at every load (a truncated copy fails here, not inside ONNX Runtime), digests on
    # request (`verify_files`; hashing a full-size graph takes seconds).
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The TensorRT engines built from the graphs (`v2t export --format trt`), None where there are none.
    tensorrt: TensorRTBlock | None = None

    @property
    def validated(self) -> bool:
        """Whether `v2t export` ran this export against PyTorch; when not, `validation["reason"]`
        says why and where to run it (`pending_validation`)."""
        return bool(self.validation) and self.validation.get("validated", True)

    def with_file_digests(self, directory: str | Path) -> "Manifest":
        """This manifest with the sizes and SHA-256 of its graphs (and their weight side files),
        tokenizer, and TensorRT engines and timing cache where it has them, in `directory`."""
        directory = Path(directory)
        graphs = list(self.graph_files.values())
        names = graphs + [self.tokenizer_file] + [n + ".data" for n in graphs if (directory / (n + ".data")).is_file()]
        names += list(self._tensorrt_files())
        return dataclasses.replace(self, files={n: {"bytes": (directory / n).stat().st_size,
                                                    "sha256": file_sha256(directory / n)} for n in names})

    def _tensorrt_files(self) -> dict[str, str]:
        """File → what it is, of the TensorRT engines: "the decode engine", ...; none without
        engines. The timing cache beside them (TIMING_CACHE_FILE) is not among them: only a
        rebuild reads it, and one without it only takes longer, so it may be deleted."""
        if self.tensorrt is None:
            return {}
        return {record.engine: f"the {graph} engine" for graph, record in self.tensorrt.engines.items()}

    def _remedy(self, directory: Path, name: str) -> tuple[str, str]:
        """(what file `name` is, for a message, and how to make it again): a TensorRT file is
        rebuilt with the command that builds the engines, anything else re-exported."""
        what = self._tensorrt_files().get(name)
        if what is None:
            return "", "re-export it with `v2t export`"
        return f", {what},", f"rebuild the engines: {rebuild_command(directory, self.source, self.tensorrt.precision)}"

    def check_files(self, directory: str | Path, verify: bool = False) -> None:
        """ArtifactError naming a listed file that is missing, of another size, or (with
        `verify`) of another SHA-256."""
        directory = Path(directory)
        for name, expected in self.files.items():
            path = directory / name
            what, remedy = self._remedy(directory, name)
            if not path.is_file():
                raise ArtifactError(f"{path}{what} is missing (listed in {directory / MANIFEST_FILE}); {remedy}")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise ArtifactError(f"{path}{what} is {size} bytes, the manifest says {expected['bytes']}: "
                                    f"truncated or replaced; {remedy}")
            if verify and file_sha256(path) != expected["sha256"]:
                raise ArtifactError(f"{path}{what} does not have the SHA-256 the manifest records: edited or "
                                    f"corrupted; {remedy}")

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        engines = {MANIFEST_KEY: self.tensorrt.to_dict()} if self.tensorrt is not None else {}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "precision": self.precision,
            "opset": self.opset,
            "source_checkpoint": self.source,
            "model_config": cfg.to_dict(),
            "graphs": {
                contract.name: {"file": self.graph_files[contract.name], **contract.to_dict()}
                for contract in graph_contracts(cfg)
            },
            "preprocessing": {
                "img_size": cfg.img_size, "frame_num": cfg.frame_num,
                "resize": "shorter side to img_size, bicubic", "crop": "center img_size",
                "color": "RGB", "scale": 1 / 255, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                # The frame encoder takes the uint8 crop and normalizes it itself.
                "normalized_by": "frame_encoder",
            },
            "special_tokens": {"pad_id": cfg.pad_id, "end_id": cfg.pad_id},
            "generation": {"max_new_tokens": cfg.text_len},
            "tokenizer": self.tokenizer_file,
            "files": self.files,
            "validation": self.validation,
            **engines,
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | Path, verify: bool = False) -> "Manifest":
        """Read and check the manifest: format, contract, files present with their recorded
        sizes, and (with `verify`) their SHA-256."""
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
            for contract in graph_contracts(config):
                declared = {k: graphs[contract.name][k] for k in ("inputs", "outputs")}
                if declared != contract.to_dict():
                    raise ArtifactError(f"{path}: the {contract.name} graph's declared inputs and outputs "
                                        "differ from this v2t's contract; re-export with this v2t")
            manifest = cls(config=config, opset=data["opset"], precision=data.get("precision", "fp32"),
                           graph_files={c.name: graphs[c.name]["file"] for c in graph_contracts(config)},
                           tokenizer_file=data["tokenizer"], validation=data.get("validation", {}),
                           source=data.get("source_checkpoint", ""), files=data.get("files", {}),
                           tensorrt=TensorRTBlock.from_dict(data[MANIFEST_KEY], str(path))
                           if MANIFEST_KEY in data else None)
        except KeyError as err:
            raise ArtifactError(f"{path} lacks the entry {err}; re-export with this v2t") from None
        except ConfigError as err:
            raise ArtifactError(f"{path}: {err}") from None
        for name in (*manifest.graph_files.values(), manifest.tokenizer_file):
            if not (directory / name).is_file():
                raise ArtifactError(f"{directory / name} is missing (listed in {path})")
        manifest.check_files(directory, verify)
        return manifest


def pending_validation(precision: str, reason: str) -> dict[str, Any]:
    """The validation record of an export that could not be run where it was made (a bf16 export
    on a machine whose ONNX Runtime has no bf16 kernels): the reason, and no figure that was not
    measured; a validated record has "validated": true and its figures."""
    return {"precision": precision, "validated": False, "greedy_token_agreement": None, "reason": reason}


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()
