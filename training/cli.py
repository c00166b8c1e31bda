"""``v2t train``: EasyNLP's ``--mode=train`` command line, on v2t's training loop.

Loaded by the ``v2t`` group only when invoked. The options come from ``TrainOptions``
(``options.py``, torch-free), so ``--help`` needs no torch; the training loop is imported only to
run. Domain errors (V2TError) are left to the ``v2t`` group, which turns them into clean messages.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import click

from v2t_engine.cli.options import checkpoint_dir_option, easynlp_option, second_sequence_option, table_options
from v2t_engine.inputs.tables import InputSchema

from v2t_training.options import TRAIN_PARAMS, TrainOptions

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainOptions)}


def train_options(command: Callable) -> Callable:
    """One option per ``TrainOptions`` field with ``cli`` metadata, in field order, its default
    the field's (shown in --help unless it is None or a flag's)."""
    for f in reversed(dataclasses.fields(TrainOptions)):
        if "cli" not in f.metadata:
            continue
        kwargs = dict(f.metadata["cli"])
        if f.default is not None and not kwargs.get("is_flag"):
            kwargs.setdefault("show_default", True)
        command = easynlp_option(f.name, default=f.default, **kwargs)(command)
    return command


@click.command("train")
@table_options(TRAIN_PARAMS, schema_default=_DEFAULTS["input_schema"])
@second_sequence_option
@checkpoint_dir_option
@train_options
def train_command(input_schema: InputSchema, app_name: str, mode: str | None, **options) -> None:
    """Train a video captioner on TABLES (train table first, validation table last).

    \b
    Example (EasyNLP flags work as they are; run it under `torchrun --nproc_per_node N -m
    v2t_engine.cli train ...` for several processes):
      v2t train --tables train.txt,val.txt --checkpoint_dir ck \\
        --input_schema idx:str:1,imgbase64:str:1,text:str:1 \\
        --first_sequence imgbase64 --second_sequence text \\
        --learning_rate 1e-3 --epoch_num 20 --micro_batch_size 32 \\
        --user_defined_parameters 'frame_num=4 img_size=64 text_len=16 n_layer=2 n_head=4
          n_embd=128 vit_width=128 vit_layers=2 vit_heads=4 vit_patch_size=16'

    Finetune with pretrain_model_name_or_path=CHECKPOINT_DIR; start from CLIP weights with
    vit_ckpt_path=HF_CLIP_DIR (a local transformers directory; nothing is downloaded).
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    from v2t_training.train import train  # imports torch

    del app_name  # accepted for EasyNLP compatibility; v2t has one application
    if mode not in (None, "train"):
        raise click.BadParameter(f"v2t train runs --mode=train; got --mode={mode}", param_hint="--mode")
    # Progress lines are what --logging_steps asks for: show them unless logging is already finer.
    train_log = logging.getLogger("v2t_training")
    if train_log.getEffectiveLevel() > logging.INFO:
        train_log.setLevel(logging.INFO)
    opts = TrainOptions(input_schema=str(input_schema), **options)  # the text form, as checkpoints keep it
    with logging_redirect_tqdm():
        out = train(opts)
    click.echo(f"checkpoint written to {out}", err=True)
