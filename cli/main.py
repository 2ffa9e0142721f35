"""`w2wreg`: a weight-space registry for customized diffusion models."""

from __future__ import annotations

import os
from pathlib import Path

import click

# transformers warns about optional image backends (torchvision) on every pipeline import: noise for a
# CLI that loads no image processor. Set TRANSFORMERS_VERBOSITY to see them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from cli.errors import ErrorHandlingGroup  # noqa: E402
from registry.paths import DEFAULT_DIR, ENV_VAR


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--registry",
    "registry_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=ENV_VAR,
    default=DEFAULT_DIR,
    show_default=True,
    help=f"Registry folder (or set ${ENV_VAR}).",
)
@click.version_option(package_name="w2wreg")
@click.pass_context
def cli(ctx: click.Context, registry_dir: Path) -> None:
    """Put LoRAs into one weight space, find similar models by their weights, get models back out.

    \b
    w2wreg init
    w2wreg add loras/ --attrs-csv attributes.csv
    w2wreg search --like alice -k 5 --where "beard AND NOT glasses"
    w2wreg export alice --format peft -o alice-peft/
    """
    ctx.obj = registry_dir


def _register() -> None:
    from cli import (
        demo,
        edits,
        hub,
        ingest,
        invert,
        maintenance,
        models,
        render,
        search,
        serve,
        space,
        tour,
        toyfaces,
    )

    for module in (models, ingest, invert, search, space, edits, render, maintenance, serve, hub, demo, tour, toyfaces):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="w2wreg")
