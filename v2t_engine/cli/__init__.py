"""The `v2t` command line.

`predict`, `eval` and `synth` live here and never import torch. `train` and `export` need torch
and are imported only when invoked, through LazyGroup.
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

from .options import (checkpoint_dir_option, compose, easynlp_option, first_sequence_option,
                          input_schema_option, micro_batch_size_option,
                          user_defined_parameters_option, app_name_option, mode_option)
from ..errors import RowError, V2TError

# name → "module:attribute" of commands that must not be imported until used.
LAZY_COMMANDS = {
    "train": "v2t_training.cli:train_command",
    "export": "v2t_export.cli:export_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                raise click.ClickException(
                    f"`v2t {name}` needs the training stack ({exc.name} is missing): "
                    "pip install torch==2.13.0 && pip install 'v2t[train]'") from None
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """v2t: train, export and serve EasyNLP-style video captioning models."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Bad rows and warnings must be visible by default: keep v2t's own warnings at WARNING.
    logging.getLogger("v2t_engine").setLevel(min(level, logging.WARNING))


VIDEOS_HELP = ("Videos: a directory (walked recursively, sorted; a folder of images is one video), "
               "a text file listing paths one per line, or video files, comma-separated.")


def video_options(frames_help: str):
    """Frame choice and encoding options of `make-table` and `predict --videos`."""
    return compose(
        click.option("--frames", type=click.IntRange(min=1), default=None, help=frames_help),
        click.option("--sampling", default="uniform", show_default=True,
                     help="uniform: the frames at the centres of K equal parts of the video; "
                          "first: the first K frames; fps:N: N frames a second (at most K with --frames)."),
        click.option("--size", type=click.IntRange(min=1), default=None,
                     help="Shrink frames so their shorter side is SIZE pixels (never enlarged)."),
        click.option("--format", "image_format", type=click.Choice(["jpeg", "png"]), default="jpeg",
                     show_default=True, help="How frames are encoded in the table."),
        click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True,
                     help="JPEG quality."),
        click.option("--idx", "idx_style", type=click.Choice(["path", "stem"]), default="path",
                     show_default=True,
                     help="idx of a row: the path (relative to the directory given), or the file name "
                          "without extension."),
    )


def _frame_options(frames, sampling, size, image_format, quality):
    from ..video.decode import FrameOptions, Sampling

    return FrameOptions(frames=frames, sampling=Sampling.parse(sampling), size=size,
                        format=image_format, quality=quality)


@main.command("make-table")
@click.option("--videos", required=True, help=VIDEOS_HELP)
@easynlp_option("outputs", required=True, type=click.Path(dir_okay=False), help="Table to write.")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="idx TAB caption lines: adds a caption column (one row per caption), for training.")
@video_options("Frames per video (default 4; with fps:N, every sampled frame). "
               "Use the model's frame_num: predict reads the first frame_num frames of a row.")
@easynlp_option("workers", type=click.IntRange(min=1), default=None,
                help="Processes decoding videos (default: one per core).")
def make_table_command(videos, outputs, captions, frames, sampling, size, image_format, quality,
                       idx_style, workers):
    """Decode VIDEOS into an EasyNLP table: idx TAB JSON list of base64 frames [TAB caption].

    \b
    Example:
      v2t make-table --videos clips/ --outputs test.txt --frames 4 --size 256
      v2t predict --tables test.txt --outputs out.txt --checkpoint_dir export/ \\
        --input_schema idx:str:1,imgbase64:str:1

    Files that cannot be read are listed in OUTPUTS.errors.tsv (line = position among the
    inputs, idx, reason) and left out; exit status 3 when there are some, 0 otherwise.
    """
    import os

    from tqdm import tqdm

    from ..jobs.make_table import make_table
    from ..video.inputs import count_inputs
    from ..video.decode import require_av

    try:
        require_av()
        opts = _frame_options(frames, sampling, size, image_format, quality)
        workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        with tqdm(total=count_inputs(videos), unit="video", desc="make-table", dynamic_ncols=True,
                  disable=None) as bar:
            report = make_table(videos, outputs, opts, captions_path=captions, workers=workers,
                                idx_style=idx_style, progress=bar.update)
    except V2TError as err:
        raise click.ClickException(str(err)) from None
    _report_and_exit(f"wrote {report.rows} rows for {report.videos_ok} videos into {report.outputs}",
                     f"{report.failed} inputs", report.errors_path, report.exit_code)


def _report_and_exit(summary: str, failed: str, errors_path: str | None, exit_code: int) -> None:
    """The closing lines of a job that reports bad inputs: a summary, where the failures are."""
    click.echo(summary, err=True)
    if errors_path:
        click.echo(f"{failed} failed; see {errors_path}", err=True)
    sys.exit(exit_code)


PREDICT_PARAMS = ("frame_num", "max_generated_num", "text_len", "img_size", "img_len",
                  "enable_img_path", "img_root_dir")


@main.command("predict")
@easynlp_option("tables", default=None, help="Comma-separated table paths (or use --videos).")
@click.option("--videos", default=None, help=VIDEOS_HELP + " Captioned directly, without a table.")
@easynlp_option("outputs", required=True, type=click.Path(dir_okay=False), help="Output table path.")
@checkpoint_dir_option
@input_schema_option
@first_sequence_option
@easynlp_option("output_schema", default="idx,gen_text", show_default=True,
                help="Output columns: input column names and gen_text.")
@easynlp_option("append_cols", default="", help="Input columns to append to each output row.")
@micro_batch_size_option
@user_defined_parameters_option
@click.option("--backend", type=click.Choice(["auto", "ort", "torch"]), default="auto", show_default=True,
              help="auto: ONNX Runtime for an export directory, PyTorch for a training checkpoint.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: all cores).")
@easynlp_option("do_sample", is_flag=True, help="Sample instead of greedy decoding.")
@easynlp_option("top_k", type=click.IntRange(min=0), default=0, show_default=True, help="Top-k filter (0: off).")
@easynlp_option("top_p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                help="Nucleus filter (1: off).")
@easynlp_option("temperature", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@easynlp_option("seed", type=int, default=None, help="Makes sampling reproducible.")
@easynlp_option("on_error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
                help="skip: report bad rows in OUTPUTS.errors.tsv and go on; fail: stop at the first.")
@easynlp_option("workers", type=click.IntRange(min=1), default=2, show_default=True,
                help="Threads decoding frames ahead of the model (and, with --videos, processes "
                     "decoding videos).")
@video_options("With --videos: frames per video (default: frame_num).")
@app_name_option
@mode_option
def predict_command(tables, videos, outputs, checkpoint_dir, input_schema, first_sequence, output_schema,
                    append_cols, micro_batch_size, user_defined_parameters, backend, device, threads,
                    do_sample, top_k, top_p, temperature, seed, on_error, workers, frames, sampling,
                    size, image_format, quality, idx_style, app_name, mode):
    """Caption every row of TABLES (or every video of VIDEOS) into OUTPUTS (idx TAB JSON list of
    captions).

    \b
    Example:
      v2t predict --tables test.txt --outputs out.txt --checkpoint_dir export/ \\
        --input_schema idx:str:1,imgbase64:str:1 --first_sequence imgbase64
      v2t predict --videos clips/ --outputs out.txt --checkpoint_dir export/

    With --videos, each video becomes in memory the row `v2t make-table` would write with the
    same options (the input schema is then idx and the frames column), so the captions are
    those of make-table + predict.

    Exit status: 0 when every row was captioned, 3 when some rows were left out (listed in
    OUTPUTS.errors.tsv), 1 on errors that stop the job.
    """
    from tqdm import tqdm

    from ..runtime.captioner import Captioner
    from ..inputs.frames import FrameSource
    from ..params import get_bool, get_int, parse_user_defined_parameters
    from ..jobs.predict import PredictOptions, count_rows, parse_columns, predict_tables
    from ..runtime.search import SearchOptions
    from ..inputs.tables import InputSchema, iter_tables

    if (tables is None) == (videos is None):
        raise click.UsageError("give either --tables or --videos")
    try:
        if videos is not None:
            from ..video.decode import require_av

            require_av()  # before the model loads: say it at once
        params = parse_user_defined_parameters(user_defined_parameters, PREDICT_PARAMS)
        captioner = Captioner.load(checkpoint_dir, backend=backend, device=device, threads=threads)
        cfg = captioner.config
        for key, want in (("img_size", cfg.img_size), ("img_len", cfg.img_len)):
            if get_int(params, key, want) != want:
                raise click.BadParameter(f"{key}={params[key]} but the model was built with {key}={want}",
                                         param_hint="--user_defined_parameters")
        rows = total = None
        if videos is not None:
            from ..jobs.make_table import VideoRows
            from ..video.inputs import count_inputs

            frame_opts = _frame_options(frames or get_int(params, "frame_num", cfg.frame_num), sampling,
                                        size, image_format, quality)
            rows = VideoRows(videos, frame_opts, column=first_sequence, workers=workers, idx_style=idx_style)
            input_schema, total = f"idx:str:1,{first_sequence}:str:1", count_inputs(videos)
            params.pop("enable_img_path", None)  # the rows hold base64 frames, never paths
        table_list = tuple(iter_tables(tables)) if tables is not None else ()
        opts = PredictOptions(
            tables=table_list, outputs=outputs, input_schema=InputSchema.parse(input_schema),
            first_sequence=first_sequence, output_schema=parse_columns(output_schema),
            append_cols=parse_columns(append_cols), micro_batch_size=micro_batch_size,
            frame_num=get_int(params, "frame_num"), text_len=get_int(params, "text_len"),
            search=SearchOptions(do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature,
                                 num_return=get_int(params, "max_generated_num", 1), seed=seed),
            on_error=on_error, workers=workers,
            frame_source=FrameSource(enable_img_path=get_bool(params, "enable_img_path", False),
                                     img_root_dir=params.get("img_root_dir")))
        with tqdm(total=count_rows(table_list) if rows is None else total, unit="row", desc="predict",
                  dynamic_ncols=True, disable=None) as bar:
            report = predict_tables(captioner, opts, progress=bar.update, rows=rows)
    except RowError as err:
        raise click.ClickException(f"bad row in {tables or videos}, {err}; no output written "
                                   "(use --on_error skip to leave bad rows out)") from None
    except V2TError as err:
        raise click.ClickException(str(err)) from None
    _report_and_exit(f"captioned {report.rows_ok} rows into {report.outputs}", f"{report.rows_failed} rows",
                     report.errors_path, report.exit_code)


@main.command("eval")
@easynlp_option("predictions", required=True, type=click.Path(exists=True, dir_okay=False),
                help="Output of v2t predict (idx TAB gen_text).")
@easynlp_option("references", required=True, type=click.Path(exists=True, dir_okay=False),
                help="idx TAB reference caption; repeat an idx for several references.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_command(predictions, references, as_json):
    """Score captions: BLEU-4, CIDEr-D and exact match.

    \b
    Example:
      v2t eval --predictions out.txt --references test_refs.txt
    """
    import json

    from ..jobs.metrics import caption_metrics, format_metrics, read_predictions, read_references

    try:
        metrics = caption_metrics(read_predictions(predictions), read_references(references))
    except V2TError as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps(metrics, ensure_ascii=False, indent=2) if as_json else format_metrics(metrics))


@main.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--train", "n_train", type=click.IntRange(min=1), default=800, show_default=True)
@click.option("--val", "n_val", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--test", "n_test", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--frames", type=click.IntRange(min=1), default=6, show_default=True, help="Frames per clip.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth_command(out_dir, n_train, n_val, n_test, frames, seed):
    """Write the built-in synthetic dataset (moving coloured shapes, Chinese captions) to OUT_DIR:
    train.txt, val.txt, test.txt and test_refs.txt.

    \b
    Example:
      v2t synth data/ && v2t train --tables data/train.txt,data/val.txt --checkpoint_dir ck ...
    """
    from ..jobs.synth import write_dataset

    paths = write_dataset(out_dir, n_train=n_train, n_val=n_val, n_test=n_test, frames=frames, seed=seed)
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


if __name__ == "__main__":
    main()
