"""`w2wreg search`: nearest models by weights."""

from __future__ import annotations

import click

from cli.models import drop_text_encoder_option, open_registry
from cli.output import emit_json, json_option, table
from registry.search import METRICS


@click.command()
@click.option("--like", "like", required=True, help="A model (name or id) or a LoRA file/folder.")
@click.option("-k", "k", type=click.IntRange(1, 10_000), default=10, show_default=True, help="How many neighbours.")
@click.option("--where", help='Only models matching this SQL condition over attributes, e.g. "beard AND age < 40".')
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    default="l2",
    show_default=True,
    help="l2/cosine on the flat vectors; delta = sum of ||B1A1 - B2A2||_F per layer (factorization-invariant).",
)
@click.option("--base-model", help="For a file query: the base model it was trained on.")
@drop_text_encoder_option
@json_option
@click.pass_context
def search(ctx, like, k, where, metric, base_model, drop_text_encoder, as_json):
    """Find the models whose weights are nearest to a model or a LoRA file.

    Exact: every model of the space that matches --where is compared, so you get the true k nearest.

    \b
    w2wreg search --like alice -k 5
    w2wreg search --like new_lora.safetensors --where "NOT glasses" --metric delta
    """
    reg = open_registry(ctx)
    result = reg.search(
        like, k=k, where=where, metric=metric, base_model=base_model, drop_text_encoder=drop_text_encoder
    )
    if as_json:
        emit_json(result.to_json())
        return
    click.echo(f"nearest to {result.query} in space {result.space_id} ({metric}):")
    if not result.hits:
        click.echo("  no models match")
        return
    table(
        ["rank", "id", "name", "distance", "attributes"],
        [(i + 1, h.model.id, h.model.name, h.distance, h.model.attributes) for i, h in enumerate(result.hits)],
    )


COMMANDS = [search]
