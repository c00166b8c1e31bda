"""`v2t predict`: the command line of jobs/predict.py."""
from __future__ import annotations

import click

from ..inputs.tables import FRAMES_COLUMN, IDX_COLUMN
from ..jobs.predict import GEN_TEXT, OUTPUT_FORMATS, PREDICT_PARAMS
from ..runtime.backends import backend_names
from .options import (ColumnList, TableList, app_name_option, checkpoint_dir_option, compose, device_option,
                      easynlp_option, exit_with_report, first_sequence_option, micro_batch_size_option, mode_option,
                      ShardSpec, schema_option, user_parameters_option)
from .video import VIDEOS_HELP, video_options


# Greedy by default; --do_sample with top-k / top-p / temperature, seeded.
sampling_options = compose(
    easynlp_option("do_sample", is_flag=True, help="Sample instead of greedy decoding."),
    easynlp_option("top_k", type=click.IntRange(min=0), default=0, show_default=True, help="Top-k filter (0: off)."),
    easynlp_option("top_p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                   help="Nucleus filter (1: off)."),
    easynlp_option("temperature", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True),
    easynlp_option("seed", type=int, default=None, help="Makes sampling reproducible."),
    easynlp_option("num_beams", type=click.IntRange(min=1), default=1, show_default=True,
                   help="Beam search with this many beams (1: greedy); max_generated_num <= num_beams "
                        "returns the best captions in order. Not with --do_sample."),
    easynlp_option("length_penalty", type=float, default=1.0, show_default=True,
                   help="Beams: a caption scores its log-probability / length ** length_penalty."),
    easynlp_option("early_stopping", is_flag=True,
                   help="Beams: stop once num_beams captions ended, not when none can improve."),
    easynlp_option("no_repeat_ngram_size", type=click.IntRange(min=0), default=0, show_default=True,
                   help="No n-gram of this size twice in a caption (0: off)."),
    easynlp_option("repetition_penalty", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
                   help="Above 1, tokens already in the caption become less likely (1: off)."))


# An interrupted job continues where it durably got; a job splits into shards without coordination.
resume_options = compose(
    click.option("--resume", is_flag=True,
                 help="Continue the interrupted job that wrote OUTPUTS.partial (same inputs, model and "
                      "options, checked against OUTPUTS.job.json)."),
    click.option("--overwrite", is_flag=True, help="Start over, replacing an interrupted job's OUTPUTS.partial."),
    click.option("--shard", type=ShardSpec(), default=None,
                 help="I/N: caption only the I-th (0-based) of N parts of TABLES, split by bytes; merge "
                      "the N outputs with `v2t merge-shards`."),
    click.option("--sync_interval", "--sync-interval", type=click.FloatRange(min=0), default=10.0,
                 show_default=True, help="Seconds between fsyncs of the outputs and saves of the job "
                                         "record: at most this much captioning is redone after a crash."),
    click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                 help="Run on a Ray cluster (the ray extra): ADDRESS of its head, or nothing for "
                      "RAY_ADDRESS / a local cluster."))


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
              help="auto: for an export directory TensorRT where it holds engines this machine can run "
                   "(--device cuda), else ONNX Runtime; PyTorch for a training checkpoint.")
@device_option
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Compute precision of the torch-fast backend (default: bf16 on cuda, fp32 on cpu). An "
                   "export's precision is fixed when it is exported: given here, it must match.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: all cores).")
@click.option("--verify", is_flag=True,
              help="Check the SHA-256 of every export file against its manifest before running (sizes "
                   "are always checked).")
@sampling_options
@easynlp_option("on_error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
                help="skip: report bad rows in OUTPUTS.errors.tsv and go on; fail: stop at the first.")
@easynlp_option("workers", type=click.IntRange(min=1), default=2, show_default=True,
                help="Threads decoding frames ahead of the model when --decode_processes is 0 (and, "
                     "with --videos, processes decoding videos).")
@easynlp_option("decode_processes", type=click.IntRange(min=0), default=None,
                help="Processes decoding frames ahead of the model (0: --workers threads instead). "
                     "Default: one per core but one where there are more than 2 cores, else 0.")
@video_options("With --videos: frames per video (default: frame_num).")
@resume_options
@app_name_option
@mode_option
def predict_command(tables, videos, checkpoint_dir, user_defined_parameters, backend, device, precision, threads,
                    verify,
                    resume, overwrite, ray_address,
                    do_sample, top_k, top_p, temperature, seed, num_beams, length_penalty, early_stopping,
                    no_repeat_ngram_size, repetition_penalty, frame_opts, idx_style, app_name, mode, **fields):
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
    if resume and overwrite:
        raise click.UsageError("--resume continues the partial output, --overwrite replaces it: give one")
    if ray_address is not None and (videos is not None or resume or fields.get("shard")):
        raise click.UsageError("--ray runs a whole job over --tables (Ray reruns what a dead worker "
                               "was doing); it takes no --videos, --resume or --shard")
    search = SearchOptions(do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed,
                           num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                           no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty)
    opts = PredictOptions.from_user_parameters(user_defined_parameters, search, tables=tables or (), **fields)
    if videos is not None:
        from ..video.decode import require_av

        require_av()  # before the model loads: say it at once
    if ray_address is not None:
        return _predict_on_ray(checkpoint_dir, opts, ray_address, backend, device, threads, verify, overwrite)
    captioner = Captioner.load(checkpoint_dir, backend=backend, device=device, threads=threads, verify=verify,
                               precision=precision)
    whole = not resume and opts.shard is None
    total = (count_rows(opts.tables) if whole else None) if videos is None else count_inputs(videos)
    with tqdm(total=total, unit="row", desc="predict", dynamic_ncols=True, disable=None) as bar:
        if videos is None:
            report = predict_tables(captioner, opts, progress=bar.update, model_dir=checkpoint_dir,
                                    resume=resume, overwrite=overwrite)
        else:
            report = predict_videos(captioner, videos, opts, frame_opts, idx_style, progress=bar.update)
    exit_with_report(report)


def _predict_on_ray(checkpoint_dir, opts, address: str, backend, device, threads, verify, overwrite) -> None:
    from tqdm import tqdm

    from ..jobs.predict import count_rows
    from ..ray import predict_tables_ray

    with tqdm(total=count_rows(opts.tables), unit="row", desc="predict (ray)", dynamic_ncols=True,
              disable=None) as bar:
        report = predict_tables_ray(str(checkpoint_dir), opts, address or None, backend=backend, device=device,
                                    threads=threads, verify=verify, progress=bar.update, overwrite=overwrite)
    exit_with_report(report)


@click.command("merge-shards")
@easynlp_option("outputs", required=True, type=click.Path(dir_okay=False), help="The merged output table.")
@click.argument("shard_outputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def merge_shards_command(outputs, shard_outputs):
    """Merge the outputs of `v2t predict --shard I/N` (all N, any order) into OUTPUTS, with
    their error reports into OUTPUTS.errors.tsv: byte for byte what one unsharded run writes.

    \b
    Example:
      for i in 0 1 2 3; do v2t predict --tables t.txt --outputs out.$i.txt --shard $i/4 ...; done
      v2t merge-shards --outputs out.txt out.0.txt out.1.txt out.2.txt out.3.txt

    Each shard must have finished; the shards' job records (OUTPUTS.job.json) must show one
    job, every shard once, and every output holding the rows its record counted.
    """
    from ..jobs.shards import merge_shards

    exit_with_report(merge_shards(outputs, list(shard_outputs)))
