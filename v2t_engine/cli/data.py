"""`v2t eval` and `v2t synth`: caption metrics and the built-in synthetic data."""
from __future__ import annotations

import click

from .options import easynlp_option


@click.command("eval")
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

    metrics = caption_metrics(read_predictions(predictions), read_references(references))
    click.echo(json.dumps(metrics, ensure_ascii=False, indent=2) if as_json else format_metrics(metrics))


@click.command("synth")
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
