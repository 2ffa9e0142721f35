"""Commands that put models in, list them and get them out: init, add, ls, show, export, push."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.errors import EXIT_ERROR, fail
from cli.output import emit_json, json_option, table
from ingest.attributes import parse_pairs
from ingest.importer import import_paths
from registry import wspace
from registry.hubs import open_hub
from registry.registry import Registry
from registry.sketches import NEAR_THRESHOLD
from w2w.formats import FORMATS, target_files
from w2w.formats.names import known_module
from w2w.formats.tensorfile import DTYPE_CHOICES

drop_text_encoder_option = click.option(
    "--drop-text-encoder",
    is_flag=True,
    help="Leave out the text-encoder part of LoRAs that also adapt a text encoder (kept by default).",
)


def open_registry(ctx: click.Context) -> Registry:
    return Registry.open(ctx.obj)


def hub_option(f):
    return click.option(
        "--hub",
        "hub_spec",
        metavar="URL|DIR",
        envvar="W2WREG_HUB",
        default=None,
        help="A Hugging Face-protocol hub (https://huggingface.co, http://host:8000 for a `w2wreg serve`; token "
        "from HF_TOKEN or `hf auth login`) or a hub folder, instead of the registry's own folder hub. "
        "[env: W2WREG_HUB]",
    )(f)


@click.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create a registry folder (default ./w2w-registry, or --registry / $W2WREG_HOME).

    \b
    w2wreg init --registry ~/loras/registry
    """
    reg = Registry.init(ctx.obj)
    click.echo(f"registry ready at {reg.root}")


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--name", help="Model name (one LoRA only). Default: the file or folder name without extension.")
@click.option(
    "--attr", "attrs", multiple=True, metavar="KEY=VALUE", help="An attribute (number or true/false); repeatable."
)
@click.option(
    "--attrs-csv",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CSV with a header row: model name, then one column per attribute.",
)
@click.option("--base-model", help="Base model id the LoRA was trained on (when the file does not say).")
@click.option(
    "--allow-pickle", is_flag=True, help="Also read pickled .bin/.pt/.ckpt files (torch.load(weights_only=True))."
)
@drop_text_encoder_option
@click.option("--skip-errors", is_flag=True, help="Add the good LoRAs even when some inputs are bad.")
@click.option(
    "--on-near-copy",
    type=click.Choice(["keep", "skip"]),
    default="keep",
    show_default=True,
    help="A near copy of a registered model (fp16 copy, resize, renaming): add it anyway, or skip it. "
    "Either way it is reported and, when kept, recorded (see `w2wreg dupes`).",
)
@click.option(
    "--near-copy-threshold",
    type=click.FloatRange(0, 1),
    default=NEAR_THRESHOLD,
    show_default=True,
    help="Relative dW distance (||dW1 - dW2|| / ||dW||) below which a model is a near copy; 0 turns the check off.",
)
@hub_option
@json_option
@click.pass_context
def add(
    ctx,
    paths,
    name,
    attrs,
    attrs_csv,
    base_model,
    allow_pickle,
    drop_text_encoder,
    skip_errors,
    on_near_copy,
    near_copy_threshold,
    hub_spec,
    as_json,
):
    """Add LoRA files, PEFT adapter folders, folders of them, or hub repos (hub:NAMESPACE/NAME[@REV]).

    Nothing is added unless every input is good (or --skip-errors); a LoRA already in the
    registry (same file or same weights) is skipped. A near copy of a registered model (relative dW
    distance below --near-copy-threshold, in any rank, targets or format of its family) is reported.

    \b
    w2wreg add alice.safetensors --attr beard=true --attr age=31
    w2wreg add loras/ --attrs-csv attributes.csv --base-model runwayml/stable-diffusion-v1-5
    w2wreg add hub:team/alice
    """
    reg = open_registry(ctx)
    reg.hub = open_hub(hub_spec, reg.hub)
    report = import_paths(
        reg,
        list(paths),
        name=name,
        attributes=parse_pairs(attrs),
        attrs_csv=attrs_csv,
        base_model=base_model,
        allow_pickle=allow_pickle,
        drop_text_encoder=drop_text_encoder,
        skip_errors=skip_errors,
        progress=not as_json,
        on_near_copy=on_near_copy,
        near_threshold=near_copy_threshold,
    )
    if as_json:
        emit_json(report.to_json())
    else:
        for w in report.warnings:
            click.echo(f"warning: {w}", err=True)
        for _, why in report.skipped:
            click.echo(f"skipped: {why}", err=True)
        for n in report.near_copies:
            if n["kept"]:
                click.echo(
                    f"{n['name']}: near copy of {n['of']}: relative dW distance {n['relative_distance']:.2%}: "
                    f"{n['guess']} (kept; --on-near-copy skip to skip such copies)",
                    err=True,
                )
        for _, err in report.errors:
            click.echo(f"error: {err}", err=True)
        if report.committed:
            click.echo(
                f"added {len(report.added)} model(s)" + (f", skipped {len(report.skipped)}" if report.skipped else "")
            )
        else:
            click.echo(f"nothing added: {len(report.errors)} bad input(s); fix them or pass --skip-errors", err=True)
    if report.errors:
        ctx.exit(EXIT_ERROR)


@click.command(name="ls")
@click.option("--where", help='SQL condition over attributes and columns, e.g. "beard AND age > 30".')
@json_option
@click.pass_context
def ls_(ctx, where, as_json):
    """List models, optionally filtered.

    \b
    w2wreg ls --where "glasses AND NOT hat"
    """
    reg = open_registry(ctx)
    models = reg.ls(where)
    if as_json:
        emit_json([m.to_json() for m in models])
        return
    if not models:
        click.echo("no models" + (" match" if where else " yet; add some with `w2wreg add`"))
        return
    table(
        ["id", "name", "space", "kind", "attributes"],
        [(m.id, m.name, m.space_id, m.kind, m.attributes) for m in models],
    )
    for space_id in sorted({m.space_id for m in models}):
        st = wspace.staleness(reg, space_id)
        if st and st["refit_advised"]:
            click.echo(
                f"note: {st['poorly_explained']} of {st['projected']} models of space {space_id} are poorly "
                f"explained by subspace {st['subspace']} (fitted on {st['fitted_on']}); time to `w2wreg fit`"
            )


@click.command()
@click.argument("model")
@json_option
@click.pass_context
def show(ctx, model, as_json):
    """Show one model (by name or id): its space, source, attributes, lineage and hub copies.

    \b
    w2wreg show alice --json
    """
    reg = open_registry(ctx)
    m = reg.get(model)
    space = reg.space(m.space_id)
    info = (
        m.to_json()
        | reg.catalog.source_info(m.id)
        | {
            "space": {
                "id": space.id,
                "base_model": space.base_model,
                "family": space.family,
                "layout": reg.layout(space.id).describe(),
                "layout_fingerprint": space.layout_fingerprint,
                "dim": space.dim,
                "models": space.n_models,
            },
            "lineage": reg.catalog.lineage(m.id),
            "near_copies": reg.catalog.near_copies(m.id),
            "hub": reg.catalog.hub_files(m.id),
            "projection": wspace.projection_info(reg, m.id),
        }
    )
    if as_json:
        emit_json(info)
        return
    click.echo(f"{m.name}  (id {m.id}, {m.kind})")
    click.echo(f"  space       {space.id}  {info['space']['layout']}  base model: {space.base_model or 'unknown'}")
    click.echo(f"  family      {m.family or 'unknown'}  (base model {m.base_model or 'not named'})")
    kind_dtype = ", ".join(v for v in (info["source_kind"], info["source_dtype"]) if v)
    click.echo(f"  source      {m.source or '-'}  ({m.source_format or '-'}{', ' + kind_dtype if kind_dtype else ''})")
    click.echo(f"  sha256      file {m.source_sha256 or '-'}")
    click.echo(f"              vector {m.vector_sha256}")
    click.echo(f"  added       {m.created}")
    for k, v in m.attributes.items():
        click.echo(f"  attribute   {k} = {v}")
    for n in info["near_copies"]:
        click.echo(f"  near copy   of {n['of']}: relative dW distance {n['relative_distance']:.2e} ({n['guess']})")
    for l in info["lineage"]:
        parent = f" of {l['parent'] or l['parent_id']}" if l["parent_id"] is not None else ""
        click.echo(f"  lineage     {l['operation']}{parent}  {json.dumps(l['params'], separators=(',', ':'))}")
    if p := info["projection"]:
        verdict = "well explained" if p["well_explained"] else "POORLY explained by the space: consider `w2wreg fit`"
        click.echo(
            f"  w2w space   {p['subspace']}: reconstruction error {p['relative_error']:.4f} "
            f"(fitted models' p95 {p['fitted_p95']:.4f}; {verdict})"
        )
    for h in info["hub"]:
        click.echo(f"  hub         {h['hub']}:{h['repo']}/{h['path']} @ {str(h['revision'])[:12]}")


@click.command()
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="diffusers", show_default=True)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="A .safetensors file (diffusers, kohya) or a folder (any format).",
)
@click.option("--force", is_flag=True, help="Overwrite files that already exist.")
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPE_CHOICES)),
    help="The factors' dtype.  [default: the dtype the model's file came in; fp32 for trained/derived models]",
)
@json_option
@click.pass_context
def export(ctx, model, fmt, out, force, dtype, as_json):
    """Write a model as a LoRA that diffusers, PEFT or kohya tools load (text-encoder parts included).

    \b
    w2wreg export alice --format diffusers -o out/alice/
    w2wreg export alice --format peft -o out/alice-peft/
    w2wreg export alice --format kohya --dtype fp16 -o alice_kohya.safetensors
    """
    reg = open_registry(ctx)
    if fmt == "peft" and out.suffix == ".safetensors":
        fail(f"{out}: a PEFT adapter is a folder; pass a folder path to -o")
    existing = [p for p in target_files(fmt, out) if p.exists()]
    if existing and not force:
        fail(f"{existing[0]} already exists; pass --force to overwrite it, or choose another -o")
    dtype = DTYPE_CHOICES[dtype] if dtype else None
    files = reg.export(model, fmt, out, dtype=dtype)
    unknown = [m for m in reg.lora(model).layers if not known_module(m)]
    if unknown:  # e.g. a model added before SGM names were mapped: `input.blocks.4.1.proj_in`
        click.echo(
            f"warning: {len(unknown)} modules name no module of an SD 1.x/2.x/XL UNet or CLIP text encoder (e.g. "
            f"{unknown[0]!r}); diffusers will not load them into such a pipeline. Re-add the model's source file.",
            err=True,
        )
    if as_json:
        emit_json({"model": model, "format": fmt, "dtype": dtype, "files": [str(f) for f in files]})
    else:
        for f in files:
            click.echo(f"wrote {f}")


@click.command()
@click.argument("model")
@click.option("--repo", required=True, help="NAMESPACE/NAME of the repo to create or update.")
@click.option(
    "--preview",
    "previews",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An image made with the model, shown on its card (repeatable).",
)
@hub_option
@json_option
@click.pass_context
def push(ctx, model, repo, previews, hub_spec, as_json):
    """Push a model to a hub as a diffusers LoRA with a model card.

    The card records the base model, the lineage (parents with the hub repos and revisions they were
    pushed to), the subspace and the attributes. The default hub is the registry's own folder hub
    (<registry>/hub); --hub pushes to a Hugging Face-protocol hub or another folder.

    \b
    w2wreg push alice --repo team/alice
    w2wreg push alice --repo team/alice --hub http://hub.lab:8000 --preview alice.png
    """
    reg = open_registry(ctx)
    hub = open_hub(hub_spec, reg.hub)
    result = reg.push(model, repo, hub=hub, previews=list(previews))
    if as_json:
        emit_json(result)
    else:
        where = getattr(hub, "endpoint", None) or getattr(hub, "root", hub.name)
        click.echo(f"pushed {result['model']} to {where}/{repo} @ {result['revision'][:12]}")


COMMANDS = [init, add, ls_, show, export, push]
