"""Click options shared by several commands, spelled as EasyNLP spells them (``--input_schema``)
with kebab-case aliases (``--input-schema``), declared once here."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


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


tables_option = easynlp_option(
    "tables", required=True,
    help="Comma-separated table paths (EasyNLP style). For training: train file first, validation last.")
input_schema_option = easynlp_option(
    "input_schema", default="idx:str:1,imgbase64:str:1,text:str:1", show_default=True,
    help="Columns as name:type:count, matched by position.")
first_sequence_option = easynlp_option(
    "first_sequence", default="imgbase64", show_default=True,
    help="The column holding the JSON list of base64 frames (or paths with enable_img_path=true).")
second_sequence_option = easynlp_option(
    "second_sequence", default="text", show_default=True, help="The caption column.")
checkpoint_dir_option = easynlp_option(
    "checkpoint_dir", required=True, type=click.Path(file_okay=False),
    help="Training checkpoint directory (or, for predict, an export directory).")
micro_batch_size_option = easynlp_option(
    "micro_batch_size", default=8, show_default=True, type=click.IntRange(min=1),
    help="Videos per batch.")
user_defined_parameters_option = easynlp_option(
    "user_defined_parameters", default="", help="Whitespace-separated key=value pairs, as in EasyNLP.")
# Accepted for command-line compatibility with EasyNLP; v2t infers what they selected.
app_name_option = easynlp_option("app_name", default="video2text_generation", hidden=True)
mode_option = easynlp_option("mode", default=None, hidden=True)

table_input_options = compose(tables_option, input_schema_option, first_sequence_option,
                              micro_batch_size_option, user_defined_parameters_option,
                              app_name_option, mode_option)
