"""`w2wreg toyfaces`: the embedded toy-faces world (make a dataset, look at it, detect attributes)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.output import emit_json, json_option, table


@click.group()
def toyfaces() -> None:
    """The embedded toy-faces world: procedural identities with glasses, beard, smile and hat.

    \b
    w2wreg toyfaces make faces/ --identities 50 --images 8
    w2wreg toyfaces sheet faces/ -o faces.png
    """


@toyfaces.command()
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--identities", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--images", type=click.IntRange(1, 1000), default=8, show_default=True, help="Images per identity.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(8, 256), default=32, show_default=True, help="Image side, px.")
@json_option
def make(out_dir: Path, identities: int, images: int, seed: int, size: int, as_json: bool) -> None:
    """Write a toy-faces dataset: DIR/face-NNNN/NN.png and DIR/attributes.csv, ready for `w2wreg ingest`.

    The same settings give the same bytes; rerunning on a finished dataset with the same settings does
    nothing, and any other non-empty DIR is refused.

    \b
    w2wreg toyfaces make faces/ --identities 24 --images 8 --seed 0
    """
    from ingest.toyfaces import make_dataset

    root = make_dataset(out_dir, identities=identities, images=images, seed=seed, size=size)
    if as_json:
        emit_json({"root": str(root), "identities": identities, "images": images, "seed": seed, "size": size})
    else:
        click.echo(f"{identities} identities x {images} images ({size} px) in {root}; attributes in attributes.csv")


@toyfaces.command()
@click.argument("dataset", metavar="DIR", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG to write.")
@click.option("--identities", type=click.IntRange(1), default=12, show_default=True, help="Rows (first identities).")
@click.option("--images", type=click.IntRange(1), default=8, show_default=True, help="Images per row.")
@click.option("--scale", type=click.IntRange(1, 16), default=3, show_default=True, help="Nearest-neighbour upscaling.")
def sheet(dataset: Path, output: Path, identities: int, images: int, scale: int) -> None:
    """Draw a contact sheet of a dataset (any in the ingest format): one row per identity.

    \b
    w2wreg toyfaces sheet faces/ -o faces.png --identities 8
    """
    from ingest.dataset import load_dataset, load_images
    from ingest.toyfaces import contact_sheet

    data = load_dataset(dataset, require_csv=False)[:identities]
    size = max(32, min(128, _native_size(data[0].images[0])))
    rows = []
    for d in data:
        on = [k for k, v in d.attributes.items() if v is True]
        rows.append((f"{d.name} {' '.join(on)}".strip(), list(load_images(d.images[:images], size))))
    path = contact_sheet(rows, output, scale=scale)
    click.echo(f"wrote {path} ({len(rows)} identities)")


@toyfaces.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@json_option
def detect(paths: tuple[Path, ...], as_json: bool) -> None:
    """Score images (files, or folders of them) for the toy-faces attributes with the shipped detector.

    \b
    w2wreg toyfaces detect samples/ --json
    """
    from ingest.dataset import IMAGE_SUFFIXES, load_images
    from ingest.detector import SIZE
    from ingest.detector import detect as run_detector

    files = [
        f
        for p in paths
        for f in (sorted(p.rglob("*")) if p.is_dir() else [p])
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        click.echo("no images found", err=True)
        return
    scores = run_detector(load_images(files, SIZE))
    if as_json:
        emit_json(
            [{"path": str(f), **{a: round(float(s[i]), 4) for a, s in scores.items()}} for i, f in enumerate(files)]
        )
        return
    table(["path", *scores], [(str(f), *(round(float(s[i]), 3) for s in scores.values())) for i, f in enumerate(files)])
    click.echo(
        "present (score > 0.5): " + ", ".join(f"{a} {int((s > 0.5).sum())}/{len(files)}" for a, s in scores.items())
    )


@toyfaces.command()
@click.option("--limit", type=click.IntRange(1), help="Import only the first N identities  [default: all]")
@json_option
@click.pass_context
def population(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """Register the shipped toy population: identity LoRAs trained once on the embedded base model.

    The toy world's equivalent of the paper's 64,974-model release (see ingest/toy_population.py for the
    command that made it): each identity is registered as a trained model named pop-NNNN with its
    attributes, so a space fitted afterwards is the population's. A rerun skips those already registered.

    \b
    w2wreg toyfaces population && w2wreg fit
    """
    from ingest import toy_population
    from registry.registry import Registry

    reg = Registry.init(ctx.obj)
    pop = toy_population.load()
    report = toy_population.import_into(reg, pop, limit)
    if as_json:
        emit_json(report)
    else:
        click.echo(
            f"registered {report['added']} of the toy population's {report['identities']} identities"
            + (f" ({report['skipped']} already there)" if report["skipped"] else "")
            + f" from {toy_population.ASSET.name} (sha256 {report['sha256'][:12]})"
        )


def _native_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return min(im.size)


COMMANDS = [toyfaces]
