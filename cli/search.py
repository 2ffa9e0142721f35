"""`w2wreg search`: nearest models by weights."""

from __future__ import annotations

import click

from cli.models import drop_text_encoder_option, open_registry
from cli.output import emit_json, json_option, table
from registry.search import METRICS
from registry.sketches import FAMILY_METRICS, NEAR_THRESHOLD
from registry.wspace import W2W_METRIC


@click.command()
@click.option("--like", "like", required=True, help="A model (name or id) or a LoRA file/folder.")
@click.option("-k", "k", type=click.IntRange(1, 10_000), default=10, show_default=True, help="How many neighbours.")
@click.option("--where", help='Only models matching this SQL condition over attributes, e.g. "beard AND age < 40".')
@click.option(
    "--metric",
    type=click.Choice(tuple(dict.fromkeys((*METRICS, W2W_METRIC, *FAMILY_METRICS)))),
    default="l2",
    show_default=True,
    help="l2/cosine: the flat vectors of the query's space (one layout); w2w = 1 - cos of the two models' "
    "coordinates in the space's fitted w2w subspace (centered, z-scored: who is alike, without the hub the "
    "raw vectors' common part makes; needs `w2wreg fit`); delta = ||dW1 - dW2||_F and "
    "delta-cosine = 1 - cos(dW1, dW2): every layout (rank, alpha, targets) of the query's base-model family.",
)
@click.option("--base-model", help="For a file query: the base model it was trained on.")
@drop_text_encoder_option
@json_option
@click.pass_context
def search(ctx, like, k, where, metric, base_model, drop_text_encoder, as_json):
    """Find the models whose weights are nearest to a model or a LoRA file.

    Exact: the true k nearest among the models matching --where (l2/cosine: in the space; delta: the family).

    \b
    w2wreg search --like alice -k 5
    w2wreg search --like alice --metric w2w --where "kind = 'trained'"
    w2wreg search --like new_lora.safetensors --where "NOT glasses" --metric delta
    w2wreg search --like my-sd15-lora --metric delta --where "family = 'sd15'"
    """
    reg = open_registry(ctx)
    result = reg.search(
        like, k=k, where=where, metric=metric, base_model=base_model, drop_text_encoder=drop_text_encoder
    )
    if as_json:
        emit_json(result.to_json())
        return
    where_ = f"family {result.family}, all layouts" if result.family else f"space {result.space_id}"
    click.echo(f"nearest to {result.query} in {where_} ({metric}):")
    if not result.hits:
        click.echo("  no models match")
        return
    table(
        ["rank", "id", "name", "distance", "attributes"],
        [(i + 1, h.model.id, h.model.name, h.distance, h.model.attributes) for i, h in enumerate(result.hits)],
    )


@click.command()
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=NEAR_THRESHOLD,
    show_default=True,
    help="Relative dW distance (||dW1 - dW2|| / ||dW||) below which two models are near copies.",
)
@json_option
@click.pass_context
def dupes(ctx, threshold, as_json):
    """List groups of near copies: models of one base-model family whose updates dW differ by less than
    --threshold (relative), whatever their rank, targets, dtype or format (fp16 copies, resizes, renamings).

    \b
    w2wreg dupes
    w2wreg dupes --threshold 0.001 --json
    """
    reg = open_registry(ctx)
    groups = reg.dupes(threshold)
    if as_json:
        emit_json({"threshold": threshold, "groups": groups})
        return
    if not groups:
        click.echo(f"no near copies (relative dW distance < {threshold:g})")
        return
    for g in groups:
        names = ", ".join(m["name"] for m in g["models"])
        click.echo(f"{g['family']}: {names}  (max relative dW distance {g['max_relative_distance']:.2e})")
        for p in g["pairs"]:
            click.echo(f"  {p['a']} ~ {p['b']}: {p['relative_distance']:.2e}  {p['guess']}")


COMMANDS = [search, dupes]
