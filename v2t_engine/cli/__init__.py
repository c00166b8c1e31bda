"""The `v2t` command line.

`predict`, `make-table`, `eval` and `synth` are defined in this package and never import torch.
`train` and `export` need torch: they live in their stages and register themselves as entry
points of the ``v2t.commands`` group (pyproject.toml), loaded only when invoked. Domain errors
(V2TError) become click errors here, in one place, for every command.
"""
from __future__ import annotations

import logging
from importlib.metadata import entry_points

import click

from ..errors import V2TError
from .data import eval_command, synth_command
from .predict import merge_shards_command, predict_command
from .video import make_table_command

COMMAND_GROUP = "v2t.commands"
# What a registered command needs beyond the core install.
_STAGE_INSTALL = "pip install torch==2.13.0 && pip install 'v2t[train]'"


class V2TGroup(click.Group):
    def _registered(self) -> dict:
        return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._registered()})

    def get_command(self, ctx: click.Context, name: str):
        registered = self._registered()
        if name in registered and name not in self.commands:
            try:
                return registered[name].load()
            except ImportError as exc:
                raise click.ClickException(f"`v2t {name}` needs the training stack ({exc.name} is "
                                           f"missing): {_STAGE_INSTALL}") from None
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except V2TError as err:
            exc = click.ClickException(str(err))
            exc.exit_code = getattr(err, "exit_code", exc.exit_code)  # e.g. 143 after SIGTERM
            raise exc from None


@click.group(cls=V2TGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """v2t: train, export and serve EasyNLP-style video captioning models."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Bad rows and warnings must be visible by default: keep v2t's own warnings at WARNING.
    logging.getLogger("v2t_engine").setLevel(min(level, logging.WARNING))


for _command in (predict_command, merge_shards_command, make_table_command, eval_command, synth_command):
    main.add_command(_command)
