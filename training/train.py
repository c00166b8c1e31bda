"""The training loop's entry point: EasyNLP's video2text recipe (EASYNLP.md §1, §6) on CPU or
CUDA, one process or several under ``torchrun``.

``train(TrainOptions(...))`` (``options.py``) reads the tables (train first, validation last),
resolves the model from ``--user_defined_parameters`` (``plan.py``: from scratch, from a HF CLIP
ViT, or finetuning a v2t checkpoint), trains with Muon + AdamW and a linear warm-up + cosine
decay (``optim.py``) on shifted views of each clip (``augment.py``), evaluates the validation
loss, and writes checkpoints (``checkpoint.py``) that ``--resume`` continues exactly. The run
itself is ``trainer.py``.
"""
from __future__ import annotations

from pathlib import Path

from v2t_training.distributed import setup_distributed, teardown_distributed
from v2t_training.options import TrainOptions
from v2t_training.trainer import Trainer


def train(opts: TrainOptions) -> Path:
    """Train per ``opts``; returns the checkpoint directory. Under torchrun every rank calls it."""
    d = setup_distributed(opts.device)
    try:
        return Trainer(opts, d).run()
    finally:
        teardown_distributed(d)
