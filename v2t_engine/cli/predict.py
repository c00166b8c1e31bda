"""`v2t predict`: the command line of jobs/predict.py."""
from __future__ import annotations

import click

from ..inputs.tables import FRAMES_COLUMN, IDX_COLUMN
from ..jobs.predict import GEN_TEXT, OUTPUT_FORMATS, PREDICT_PARAMS
from ..runtime.backends import backend_names
from .options import (ColumnList, TableList, app_name_option, checkpoint_dir_option, compose, easynlp_option,
                      exit_with_report, first_sequence_option, micro_batch_size_option, mode_option,
                      schema_option, user_parameters_option)
from .video import VIDEOS_HELP, video_options


# Greedy by default; --do_sample with top-k / top-p / temperature, seeded.
sampling_options = compose(
    easynlp_option("do_sample", is_flag=True, help="Sample instead of greedy decoding."),
    easynlp_option("top_k", type=click.IntRange(min=0), default=0, show_default=True, help="Top-k filter (0: off)."),
    easynlp_option("top_p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                   help="Nucleus filter (1: off)."),
    easynlp_option("temperature", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True),
    easynlp_option("seed", type=int, default=None, help="Makes sampling reproducible."))


@click.command("predict")
@easynlp_option("tables", type=TableList(), default=None, help="Comma-separated table paths (or use --videos).")
@click.option("--videos", default=None, help=VIDEOS_HELP + " Captioned directly, without a table.")
@easynlp_option("outputs", required=True, type=click.Path(dir_okay=False), help="Output table path.")
@checkpoint_dir_option
@schema_option(f"{IDX_COLUMN}:str:1,{FRAMES_COLUMN}:str:1,text:str:1")
@first_sequence_option
@easynlp_option("output_schema", type=ColumnList(), default=f"{IDX_COLUMN},{GEN_TEXT}", show_default=True,
                help="Output columns: input column names and gen_text.")
@easynlp_option("append_cols", type=ColumnList(), default="", help="Input columns to append to each output row.")
@easynlp_option("output_format", type=click.Choice(OUTPUT_FORMATS), default="json", show_default=True,
                help="gen_text as a JSON array of v2t's captions, or as EasyNLP writes it: the Python "
                     "list repr of EasyNLP's caption text (special tokens kept, spaces removed).")
@micro_batch_size_option
@user_parameters_option(PREDICT_PARAMS)
@click.option("--backend", type=click.Choice(["auto", *backend_names()]), default="auto", show_default=True,
              help="auto: ONNX Runtime for an export directory, PyTorch for a training checkpoint.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: all cores).")
@click.option("--verify", is_flag=True,
              help="Check the SHA-256 of every export file against its manifest before running (sizes "
                   "are always checked).")
@sampling_options
@easynlp_option("on_error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
                help="skip: report bad rows in OUTPUTS.errors.tsv and go on; fail: stop at the first.")
@easynlp_option("workers", type=click.IntRange(min=1), default=2, show_default=True,
                help="Threads decoding frames ahead of the model (and, with --videos, processes "
                     "decoding videos).")
@video_options("With --videos: frames per video (default: frame_num).")
@app_name_option
@mode_option
def predict_command(tables, videos, checkpoint_dir, user_defined_parameters, backend, device, threads, verify,
                    do_sample, top_k, top_p, temperature, seed, frame_opts, idx_style, app_name, mode, **fields):
    """Caption every row of TABLES (or every video of VIDEOS) into OUTPUTS (idx TAB JSON list of
    captions; with --output_format easynlp, the line EasyNLP's predictor writes).

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

    from ..jobs.predict import PredictOptions, count_rows, predict_tables, predict_videos
    from ..runtime.captioner import Captioner
    from ..runtime.search import SearchOptions
    from ..video.inputs import count_inputs

    if (tables is None) == (videos is None):
        raise click.UsageError("give either --tables or --videos")
    search = SearchOptions(do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed)
    opts = PredictOptions.from_user_parameters(user_defined_parameters, search, tables=tables or (), **fields)
    if videos is not None:
        from ..video.decode import require_av

        require_av()  # before the model loads: say it at once
    captioner = Captioner.load(checkpoint_dir, backend=backend, device=device, threads=threads, verify=verify)
    total = count_rows(opts.tables) if videos is None else count_inputs(videos)
    with tqdm(total=total, unit="row", desc="predict", dynamic_ncols=True, disable=None) as bar:
        if videos is None:
            report = predict_tables(captioner, opts, progress=bar.update)
        else:
            report = predict_videos(captioner, videos, opts, frame_opts, idx_style, progress=bar.update)
    exit_with_report(report)
