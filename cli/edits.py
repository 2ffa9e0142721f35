"""Commands that make new models from old: direction fit/ls, edit, mix."""

from __future__ import annotations

from pathlib import Path

import click

from cli.models import open_registry
from cli.output import emit_json, json_option, table
from cli.render import base_options, parse_numbers
from registry import edits
from w2w.directions import DEFAULT_METHOD, METHODS
from w2w.errors import DirectionError


@click.group()
def direction() -> None:
    """Attribute directions in the w2w space.

    \b
    w2wreg direction fit beard --debias male,young
    w2wreg direction ls
    """


@direction.command(name="fit")
@click.argument("attribute")
@click.option(
    "--method",
    type=click.Choice(sorted(METHODS)),
    default=DEFAULT_METHOD,
    show_default=True,
    help="How the direction is found (the README's table compares them).",
)
@click.option("--debias", default="", metavar="A,B,...", help="Make the direction orthogonal to these attributes'.")
@click.option(
    "--components",
    type=click.IntRange(1),
    help="Fit over the subspace's first K coefficients only (the paper edits with 1,000 of 10,000; the rest "
    "add mostly noise when there are few models)  [default: all]",
)
@click.option("--space", "space_id")
@json_option
@click.pass_context
def direction_fit(ctx, attribute, method, debias, components, space_id, as_json):
    """Fit an attribute's direction from the models' labels in the current subspace.

    \b
    w2wreg direction fit glasses
    w2wreg direction fit beard --debias smile,hat --method ridge
    w2wreg direction fit hat --components 16
    """
    reg = open_registry(ctx)
    info = edits.fit_direction(
        reg, attribute, method, tuple(a.strip() for a in debias.split(",") if a.strip()), space_id, components
    )
    if as_json:
        emit_json(info)
    else:
        extra = f", debiased against {', '.join(info['debiased_against'])}" if info["debiased_against"] else ""
        extra += f", first {info['components']} coefficients" if components else ""
        click.echo(
            f"direction {attribute} ({info['method']}, {info['n_models']} models{extra}) in {info['subspace']}; "
            f"score std {info['score_std']:.4g}"
        )


@direction.command(name="ls")
@json_option
@click.pass_context
def direction_ls(ctx, as_json):
    """List the directions of each space's current subspace.

    \b
    w2wreg direction ls --json
    """
    reg = open_registry(ctx)
    rows = edits.list_directions(reg)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no directions yet; fit one with `w2wreg direction fit ATTRIBUTE`")
        return
    table(
        ["attribute", "method", "subspace", "models", "debiased against"],
        [(r["attribute"], r["method"], r["subspace"], r["n_models"], ",".join(r["debiased_against"])) for r in rows],
    )


def _strengths(pairs: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for p in pairs:
        attr, sep, value = p.partition("=")
        try:
            out[attr.strip()] = float(value) if sep else 1.0
        except ValueError:
            raise DirectionError(f"--direction {p!r}: expected ATTRIBUTE=STRENGTH, e.g. beard=1.5") from None
    return out


@click.command()
@click.argument("model")
@click.option(
    "--direction",
    "directions",
    multiple=True,
    required=True,
    metavar="ATTRIBUTE=STRENGTH",
    help="Strength in standard deviations of the attribute's score over the registry; repeatable.",
)
@click.option("--name", help="Name of the new model (default MODEL.ATTRIBUTE+STRENGTH).")
@click.option(
    "--preview",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a PNG strip of the model edited at several strengths, all from the same noise.",
)
@click.option(
    "--preview-strengths",
    default="-2,-1,0,1,2",
    show_default=True,
    help="Multiples of the edit, one column each (0: the model as it is; 1: the edit saved).",
)
@click.option("--preview-seed", type=int, default=2, show_default=True, help="The demo sheet's seed by default.")
@click.option("--preview-steps", type=click.IntRange(1), default=25, show_default=True, help="Denoising steps.")
@base_options
@json_option
@click.pass_context
def edit(
    ctx,
    model,
    directions,
    name,
    preview,
    preview_strengths,
    preview_seed,
    preview_steps,
    base_model,
    device,
    dtype,
    as_json,
):
    """Edit a model along attribute directions; the result is a new registered model.

    \b
    w2wreg edit alice --direction beard=1 --direction smile=-0.5
    w2wreg edit face-0000 --direction glasses=2.5 --preview strip.png --preview-strengths 0,0.5,1,1.5
    """
    reg = open_registry(ctx)
    strengths = _strengths(directions)
    if preview:
        from ingest import render

        settings = render.Settings(seeds=(preview_seed,), steps=preview_steps, device=device, dtype=dtype)
        multiples = parse_numbers(preview_strengths, float, "--preview-strengths")
        # load and check the base model before registering anything: a preview that cannot be made fails first
        render.load_for(reg.get(model), reg.lora(model), settings, base_model)
    out = edits.edit(reg, model, strengths, name)
    if preview:
        out["preview"] = str(
            render.edit_strip(reg, model, strengths, preview, settings, multiples, base_model, progress=not as_json)
        )
    if as_json:
        emit_json(out)
        return
    click.echo(f"added {out['name']} (id {out['id']}), edited from {out['parent']}")
    table(
        ["attribute", "score before (sd)", "after (sd)"],
        [(a, s["before"], s["after"]) for a, s in out["scores"].items()],
    )
    if preview:
        click.echo(f"preview: {out['preview']}")


@click.command()
@click.argument("expression")
@click.option("--name", help="Name of the new model.")
@click.option(
    "--in",
    "mode",
    type=click.Choice(edits.MODES),
    default="auto",
    show_default=True,
    help="auto: coefficient space when a subspace exists, else raw vectors; models of different layouts "
    "(or --rank): factors, exact in dW by factor concatenation.",
)
@click.option(
    "--rank",
    type=click.IntRange(1),
    help="Truncate the result to this rank per module (exact truncated SVD from the factors); prints the error.",
)
@json_option
@click.pass_context
def mix(ctx, expression, name, mode, rank, as_json):
    """Make a model from arithmetic on models and directions.

    Names are models or directions (a direction counts one standard deviation of its score); quote names
    that are not plain identifiers: 'my model'. Functions: lerp(a, b, t), slerp(a, b, t). In the subspace,
    a linear expression keeps each model's part the subspace does not explain (weighted as the model),
    so "alice + 1*beard" equals `w2wreg edit alice --direction beard=1`; a slerp lies in the subspace.

    \b
    w2wreg mix "alice + 0.8*beard"
    w2wreg mix "lerp(alice, bob, 0.3)" --name alice-bob-30
    w2wreg mix "alice - bob + carol" --in raw
    w2wreg mix "0.5*rank8_style + 0.5*rank32_style" --rank 16
    """
    reg = open_registry(ctx)
    out = edits.mix(reg, expression, name, mode, rank)
    if as_json:
        emit_json(out)
        return
    if out["mode"] == "factors":
        ranks = "/".join(map(str, out["ranks"]))
        click.echo(f"added {out['name']} (id {out['id']}) by factor concatenation from {', '.join(out['parents'])}")
        click.echo(f"  rank per module {ranks}")
        if out["rank_error"] is not None:
            click.echo(f"  truncated to rank {rank}: relative dW error {out['rank_error']:.3e}")
    else:
        click.echo(f"added {out['name']} (id {out['id']}) in {out['mode']} space from {', '.join(out['parents'])}")


COMMANDS = [direction, edit, mix]
