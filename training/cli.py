"""``v2t train``: EasyNLP's ``--mode=train`` command line, on v2t's training loop.

Registered lazily by ``v2t_engine.cli`` (this module imports torch)."""
from __future__ import annotations

import logging

import click

from v2t_engine.cli.options import (checkpoint_dir_option, easynlp_option, second_sequence_option,
                                    table_input_options)
from v2t_engine.errors import V2TError


@click.command("train")
@table_input_options
@second_sequence_option
@checkpoint_dir_option
@easynlp_option("learning_rate", type=click.FloatRange(0, min_open=True), default=5e-5, show_default=True,
                help="Peak learning rate (linear warm-up, cosine decay to 10%).")
@easynlp_option("epoch_num", type=click.IntRange(min=1), default=3, show_default=True)
@easynlp_option("random_seed", type=int, default=1234, show_default=True)
@easynlp_option("logging_steps", type=click.IntRange(min=1), default=100, show_default=True)
@easynlp_option("save_checkpoint_steps", type=click.IntRange(min=1), default=None,
                help="Validate and checkpoint every N steps (default: at each epoch end).")
@easynlp_option("sequence_length", type=click.IntRange(min=1), default=None,
                help="EasyNLP's block size (img_len + text_len); only checked, the model derives it.")
@easynlp_option("weight_decay", type=click.FloatRange(min=0), default=0.01, show_default=True)
@easynlp_option("warmup_ratio", type=click.FloatRange(0, 1, max_open=True), default=0.15, show_default=True,
                help="Share of all steps spent warming the learning rate up.")
@easynlp_option("optimizer", type=click.Choice(["muon", "adamw"]), default="muon", show_default=True,
                help="muon: Muon for hidden weight matrices, AdamW for the rest; adamw: AdamW only.")
@easynlp_option("encoder_lr_scale", type=click.FloatRange(min=0, min_open=True), default=None,
                help="The frame encoder's learning rate as a multiple of --learning_rate "
                     "(default: 1.0 with muon, 0.3 with adamw).")
@easynlp_option("augment_views", type=click.IntRange(min=1), default=None,
                help="Shifted views of each clip per step (default: 3 while the frame encoder trains, "
                     "1 when it is frozen).")
@easynlp_option("augment_shift", type=click.FloatRange(0, 0.5, max_open=True), default=1 / 16,
                show_default="1/16", help="Largest shift of a view, as a share of img_size (0: none).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --checkpoint_dir (optimizer, step, RNG).")
@easynlp_option("num_workers", type=click.IntRange(min=0), default=None,
                help="DataLoader workers (default: 0 when decoded frames fit in memory, else 2).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per process (default: the cores shared among local ranks).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
def train_command(tables, input_schema, first_sequence, micro_batch_size, user_defined_parameters, app_name, mode,
                  second_sequence, checkpoint_dir, learning_rate, epoch_num, random_seed, logging_steps,
                  save_checkpoint_steps, sequence_length, weight_decay, warmup_ratio, optimizer, encoder_lr_scale,
                  augment_views, augment_shift, resume, num_workers, threads, device):
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

    from v2t_engine.params import parse_user_defined_parameters
    from v2t_engine.inputs.tables import iter_tables

    from v2t_training.train import TRAIN_PARAMS, TrainOptions, train

    if mode not in (None, "train"):
        raise click.BadParameter(f"v2t train runs --mode=train; got --mode={mode}", param_hint="--mode")
    # Progress lines are what --logging_steps asks for: show them unless logging is already finer.
    train_log = logging.getLogger("v2t_training")
    if train_log.getEffectiveLevel() > logging.INFO:
        train_log.setLevel(logging.INFO)
    try:
        opts = TrainOptions(
            tables=tuple(iter_tables(tables)), checkpoint_dir=checkpoint_dir, input_schema=input_schema,
            first_sequence=first_sequence, second_sequence=second_sequence,
            user_defined_parameters=parse_user_defined_parameters(user_defined_parameters, TRAIN_PARAMS),
            learning_rate=learning_rate, epoch_num=epoch_num, micro_batch_size=micro_batch_size,
            random_seed=random_seed, logging_steps=logging_steps, save_checkpoint_steps=save_checkpoint_steps,
            weight_decay=weight_decay, warmup_ratio=warmup_ratio, optimizer=optimizer,
            encoder_lr_scale=encoder_lr_scale, augment_views=augment_views, augment_shift=augment_shift, resume=resume, num_workers=num_workers,
            threads=threads, sequence_length=sequence_length, device=device)
        with logging_redirect_tqdm():
            out = train(opts)
    except V2TError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"checkpoint written to {out}", err=True)
