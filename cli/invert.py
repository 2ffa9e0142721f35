"""`w2wreg invert`: one image into a model inside the fitted w2w space."""

from __future__ import annotations

from pathlib import Path

import click

from cli.models import open_registry
from cli.output import emit_json, json_option


@click.command()
@click.argument("image", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--mask",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="An image: white where the loss counts (e.g. the face), black where it does not.",
)
@click.option("--components", "-k", type=click.IntRange(1), default=None, help="Coefficients to fit (default: all).")
@click.option("--steps", type=click.IntRange(1), default=400, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.1, show_default=True)
@click.option(
    "--batch-timesteps",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Timesteps and noises of the image per step (the paper: 1).",
)
@click.option(
    "--init",
    type=click.Choice(["mean", "nearest"]),
    default="mean",
    show_default=True,
    help="Start at the mean model (the paper), or at the registered model nearest to a first-pass estimate.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", help="Name of the new model (default: inverted-<image sha256 prefix>).")
@click.option("--space", "space_id", help="Space id (needed only when the registry has several).")
@click.option("--base-model", help="Base model to load (default: the space's own; the toy space: the embedded one).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@json_option
@click.pass_context
def invert(
    ctx,
    image,
    mask,
    components,
    steps,
    lr,
    batch_timesteps,
    init,
    seed,
    name,
    space_id,
    base_model,
    device,
    dtype,
    as_json,
):
    """Fit the first K subspace coefficients to IMAGE with the diffusion loss and register the model.

    The result stays inside the space (its vector is mean + std * V c), so it can be searched, edited,
    mixed, exported and pushed like any other model; its lineage records the image's sha256 and settings.

    \b
    w2wreg invert face.png --components 1000 --steps 400
    w2wreg invert face.png --mask face-mask.png --batch-timesteps 4 --init nearest --name me
    """
    from ingest.invert import InvertConfig, invert_into_registry
    from registry import wspace

    reg = open_registry(ctx)
    if components is None:
        sid = wspace.pick_space(reg, space_id)
        sm = wspace.current(reg, sid)
        components = sm.sub.k if sm is not None else 1
    config = InvertConfig(
        components=components, steps=steps, lr=lr, batch_timesteps=batch_timesteps, init=init, seed=seed
    )
    out = invert_into_registry(
        reg,
        image,
        config,
        mask_path=mask,
        name=name,
        base_model=base_model,
        device=device,
        dtype=dtype,
        space_id=space_id,
        progress=not as_json,
    )
    if as_json:
        emit_json(out)
        return
    click.echo(
        f"inverted {image.name} into {out['name']} (id {out['id']}): {out['components']} coefficients of "
        f"{out['subspace']}, started from {out['start']}, loss {out['loss_first']:.4f} -> {out['loss_final']:.4f} "
        f"in {out['seconds']:.1f}s"
    )


COMMANDS = [invert]
