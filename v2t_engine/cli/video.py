"""`v2t make-table`, and the video options it shares with `v2t predict --videos`."""
from __future__ import annotations

import functools

import click

from .options import VideoSampling, compose, easynlp_option, exit_with_report

VIDEOS_HELP = ("Videos: a directory (walked recursively, sorted; a folder of images is one video), "
               "a text file listing paths one per line, or video files, comma-separated.")


def video_options(frames_help: str):
    """Frame choice and encoding options of `make-table` and `predict --videos`; they reach the
    command as one `frame_opts` (FrameOptions) and `idx_style`."""
    def to_frame_options(func):
        def command(*args, frames, sampling, size, image_format, quality, max_video_bytes, max_video_seconds,
                    **kwargs):
            from ..video.decode import FrameOptions

            limits = {k: v for k, v in (("max_video_bytes", max_video_bytes),
                                        ("max_video_seconds", max_video_seconds)) if v is not None}
            frame_opts = FrameOptions(frames=frames, sampling=sampling, size=size, format=image_format,
                                      quality=quality, **limits)
            return func(*args, frame_opts=frame_opts, **kwargs)
        return functools.update_wrapper(command, func)  # keeps options declared below this one

    return compose(
        click.option("--frames", type=click.IntRange(min=1), default=None, help=frames_help),
        click.option("--sampling", type=VideoSampling(), default="uniform", show_default=True,
                     help="uniform: the frames at the centres of K equal parts of the video; "
                          "first: the first K frames; fps:N: N frames a second (at most K with --frames)."),
        click.option("--size", type=click.IntRange(min=1), default=None,
                     help="Shrink frames so their shorter side is SIZE pixels (never enlarged)."),
        click.option("--format", "image_format", type=click.Choice(["jpeg", "png"]), default="jpeg",
                     show_default=True, help="How frames are encoded in the table."),
        click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True,
                     help="JPEG quality."),
        click.option("--max_video_bytes", type=click.IntRange(min=1), default=None,
                     help="Video files larger than this are reported and not read (default 20 GB)."),
        click.option("--max_video_seconds", type=click.FloatRange(0, min_open=True), default=None,
                     help="Videos longer than this (by their header, else by reading up to the limit) are "
                          "reported and not decoded (default 21,600: 6 hours)."),
        click.option("--idx", "idx_style", type=click.Choice(["path", "stem"]), default="path",
                     show_default=True,
                     help="idx of a row: the path (relative to the directory given), or the file name "
                          "without extension."),
        to_frame_options,
    )


@click.command("make-table")
@click.option("--videos", required=True, help=VIDEOS_HELP)
@easynlp_option("outputs", required=True, type=click.Path(dir_okay=False), help="Table to write.")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="idx TAB caption lines: adds a caption column (one row per caption), for training.")
@video_options("Frames per video (default 4; with fps:N, every sampled frame). "
               "Use the model's frame_num: predict reads the first frame_num frames of a row.")
@easynlp_option("workers", type=click.IntRange(min=1), default=None,
                help="Processes decoding videos (default: one per core).")
def make_table_command(videos, outputs, captions, frame_opts, idx_style, workers):
    """Decode VIDEOS into an EasyNLP table: idx TAB JSON list of base64 frames [TAB caption].

    \b
    Example:
      v2t make-table --videos clips/ --outputs test.txt --frames 4 --size 256
      v2t predict --tables test.txt --outputs out.txt --checkpoint_dir export/ \\
        --input_schema idx:str:1,imgbase64:str:1

    Files that cannot be read are listed in OUTPUTS.errors.tsv (line = position among the
    inputs, idx, reason) and left out; exit status 3 when there are some, 0 otherwise.
    """
    from tqdm import tqdm

    from ..concurrency import available_cores
    from ..jobs.make_table import make_table
    from ..video.decode import require_av
    from ..video.inputs import count_inputs

    require_av()
    with tqdm(total=count_inputs(videos), unit="video", desc="make-table", dynamic_ncols=True,
              disable=None) as bar:
        report = make_table(videos, outputs, frame_opts, captions_path=captions,
                            workers=workers or available_cores(), idx_style=idx_style, progress=bar.update)
    exit_with_report(report)
