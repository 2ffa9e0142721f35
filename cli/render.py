"""`w2wreg render`: images of registered models on their base model, as one labelled grid PNG."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cli.models import open_registry
from cli.output import emit_json, json_option


def parse_numbers(text: str, kind: type, option: str) -> tuple:
    """'0,1,2' -> (0, 1, 2); a bad item is a usage error naming the option."""
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers, e.g. 0,1,2", param_hint=option) from None
    if not values:
        raise click.BadParameter("give at least one number", param_hint=option)
    return values


def base_options(f):
    """--base-model, --device, --dtype: shared by render and edit --preview."""
    f = click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)(f)
    f = click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps.")(f)
    return click.option(
        "--base-model",
        metavar="PATH|HUB_ID",
        help="Base pipeline (SD 1.x/2.x or SDXL diffusers folder or hub id; 'toy': the embedded one). "
        "Default: the one each model records.",
    )(f)


@click.command()
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("--prompt", default="sks person", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="One column per seed; every model gets the same.")
@click.option("--steps", type=click.IntRange(1), default=25, show_default=True, help="Denoising steps.")
@click.option("--guidance", type=float, default=3.0, show_default=True, help="Classifier-free guidance scale.")
@base_options
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="render.png", show_default=True
)
@json_option
@click.pass_context
def render(ctx, models, prompt, seeds, steps, guidance, base_model, device, dtype, output, as_json):
    """Render registered models (trained, imported, sampled, edited, mixed, inverted) on their base model:
    a grid PNG with one labelled row per model and one column per seed.

    \b
    w2wreg render face-0000 face-0000.glasses+1 -o faces.png
    w2wreg render alice bob --base-model runwayml/stable-diffusion-v1-5 --device cuda --dtype fp16
    w2wreg render alice --prompt "sks person wearing a hat" --seeds 0,1,2,3 --steps 50
    """
    from ingest import render as r

    reg = open_registry(ctx)
    settings = r.Settings(prompt, parse_numbers(seeds, int, "--seeds"), steps, guidance, device, dtype)
    t0 = time.perf_counter()
    done = r.render_models(reg, models, settings, base_model, progress=not as_json)
    rows = [(f"{m.name} ({m.kind})", list(ims)) for m, ims in done]
    path = r.write_grid(rows, output, [f"seed {s}" for s in settings.seeds])
    if as_json:
        emit_json(
            {
                "output": str(path),
                "models": [{"id": m.id, "name": m.name, "kind": m.kind, "base_model": m.base_model} for m, _ in done],
                "base_model": base_model,
                "prompt": prompt,
                "seeds": list(settings.seeds),
                "steps": steps,
                "guidance": guidance,
                "image_size": list(done[0][1].shape[1:3]),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    else:
        click.echo(f"wrote {path}: {len(done)} model(s) x {len(settings.seeds)} seed(s)")


COMMANDS = [render]
