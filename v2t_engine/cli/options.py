"""What the commands share: options spelled as EasyNLP spells them (``--input_schema``, with a
kebab-case alias), parameter types that turn text into checked values (so a bad value reads
``Invalid value for '--input_schema': ...``), and the closing lines of a job that reports bad
inputs."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from ..errors import ConfigError
from ..inputs.tables import FRAMES_COLUMN, TEXT_COLUMN, InputSchema, iter_tables
from ..params import parse_user_defined_parameters


# ------------------------------------------------------------------------------- parameter types
class _Checked(click.ParamType):
    """A parameter type whose conversion raises ConfigError on bad text."""

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default already converted, or a value passed from Python
        try:
            return self.parse(value)
        except ConfigError as err:
            self.fail(str(err), param, ctx)


class TableList(_Checked):
    """EasyNLP's comma-separated ``--tables``: a tuple of paths, at least one."""
    name = "table[,table...]"

    def parse(self, text: str) -> tuple[str, ...]:
        return tuple(iter_tables(text))


class ColumnList(_Checked):
    """Comma-separated column names (``--output_schema``, ``--append_cols``); may be empty."""
    name = "column[,column...]"

    def parse(self, text: str) -> tuple[str, ...]:
        return tuple(c.strip() for c in text.split(",") if c.strip())


class Schema(_Checked):
    """EasyNLP's ``--input_schema`` (``name:type:count,...``) as an InputSchema."""
    name = "schema"

    def parse(self, text: str) -> InputSchema:
        return InputSchema.parse(text)


class UserParameters(_Checked):
    """EasyNLP's ``--user_defined_parameters`` (``key=value ...``), keys limited to `allowed`."""
    name = "key=value ..."

    def __init__(self, allowed: Iterable[str]):
        self.allowed = tuple(allowed)

    def parse(self, text: str) -> dict[str, str]:
        return parse_user_defined_parameters(text, self.allowed)


class ShardSpec(_Checked):
    """``I/N``: the I-th (0-based) of N parts."""
    name = "I/N"

    def parse(self, text: str) -> tuple[int, int]:
        index, sep, count = text.partition("/")
        try:
            i, n = int(index), int(count)
        except ValueError:
            i = n = -1
        if not sep or n < 1 or not 0 <= i < n:
            raise ConfigError(f"{text!r} is not I/N with 0 <= I < N (e.g. 0/4 ... 3/4)")
        return i, n


class VideoSampling(_Checked):
    """``uniform``, ``first`` or ``fps:N``."""
    name = "uniform|first|fps:N"

    def parse(self, text: str):
        from ..video.decode import Sampling

        return Sampling.parse(text)


# ------------------------------------------------------------------------------- options
def easynlp_option(name: str, dest: str | None = None, **kwargs: Any) -> Callable:
    """``easynlp_option("input_schema", ...)`` accepts --input_schema and --input-schema; the
    value reaches the command as ``dest`` (default: the name)."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    return click.option(*flags, dest or name, **kwargs)


def compose(*decorators: Callable) -> Callable:
    def apply(func: Callable) -> Callable:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


def table_list_option(**kwargs: Any) -> Callable:
    return easynlp_option("tables", type=TableList(), **{
        "required": True, "help": "Comma-separated table paths (EasyNLP style). For training: train "
                                  "file first, validation last.", **kwargs})


def schema_option(default: str) -> Callable:
    return easynlp_option("input_schema", type=Schema(), default=default, show_default=True,
                          help="Columns as name:type:count, matched by position.")


def user_parameters_option(allowed: Iterable[str]) -> Callable:
    allowed = tuple(allowed)
    return easynlp_option("user_defined_parameters", type=UserParameters(allowed), default="",
                          help=f"Whitespace-separated key=value pairs, as in EasyNLP ({', '.join(allowed)}).")


first_sequence_option = easynlp_option(
    "first_sequence", default=FRAMES_COLUMN, show_default=True,
    help="The column holding the JSON list of base64 frames (or paths with enable_img_path=true).")
second_sequence_option = easynlp_option(
    "second_sequence", default=TEXT_COLUMN, show_default=True, help="The caption column.")
checkpoint_dir_option = easynlp_option(
    "checkpoint_dir", required=True, type=click.Path(file_okay=False),
    help="Training checkpoint directory (or, for predict, an export directory).")
micro_batch_size_option = easynlp_option(
    "micro_batch_size", default=8, show_default=True, type=click.IntRange(min=1),
    help="Videos per batch.")
device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
    help="cuda: the GPU, running an export's TensorRT engines where this machine can (the trt backend), "
         "else its ONNX graphs with ONNX Runtime's CUDA provider; tensorrt: the ONNX graphs with ONNX "
         "Runtime's TensorRT provider (onnxruntime-gpu with TensorRT).")
# Accepted for command-line compatibility with EasyNLP; v2t infers what they selected.
app_name_option = easynlp_option("app_name", default="video2text_generation", hidden=True)
mode_option = easynlp_option("mode", default=None, hidden=True)


def table_options(allowed_parameters: Iterable[str], schema_default: str) -> Callable:
    """The options every EasyNLP table command takes."""
    return compose(table_list_option(), schema_option(schema_default), first_sequence_option,
                   micro_batch_size_option, user_parameters_option(allowed_parameters),
                   app_name_option, mode_option)



# ------------------------------------------------------------------------------- job epilogue
def exit_with_report(report) -> None:
    """The closing lines of a job that writes a table and an error report (a TableReport): what it
    wrote, where the failures are, and its exit status (0, or 3 when some inputs failed)."""
    click.echo(report.summary(), err=True)
    if report.errors_path:
        click.echo(f"{report.failed} inputs failed; see {report.errors_path}", err=True)
    sys.exit(report.exit_code)
