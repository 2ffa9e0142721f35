"""`w2wreg ingest`: train identity LoRAs from image folders, or import the weights2weights release."""

from __future__ import annotations

from pathlib import Path

import click

from cli.errors import EXIT_ERROR, fail
from cli.models import hub_option
from cli.output import emit_json, json_option
from registry.hubs import open_hub


@click.command()
@click.argument("dataset", required=False, type=click.Path(path_type=Path))
@click.option(
    "--base-model",
    help="A local diffusers folder or a hub id (org/name). Default: the embedded toy-faces model.",
)
@click.option(
    "--recipe",
    type=click.Choice(["toy", "w2w"]),
    default="toy",
    show_default=True,
    help="toy: the embedded base model, CPU-sized; w2w: the paper's SD 1.5 recipe (GPU).",
)
@click.option("--steps", type=click.IntRange(1), help="Training steps per identity (default: the recipe's).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Learning rate (default: the recipe's).")
@click.option("--seed", type=int, help="The one seed every identity starts from (default: the recipe's, 0).")
@click.option(
    "--batch-identities",
    "-B",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Identities trained together in one loop (each through its own LoRA factors, same result as alone).",
)
@click.option("--workers", type=click.IntRange(1), help="Start a local Dask cluster with this many worker processes.")
@click.option("--scheduler", metavar="ADDRESS", help="Use a running Dask scheduler (tcp://host:8786).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Train at most this many new identities this run.")
@click.option("--push-to", metavar="NAMESPACE/PREFIX", help="Also push each trained model to the hub as PREFIX<name>.")
@click.option(
    "--from-w2w-release",
    "release",
    type=click.Path(file_okay=False, path_type=Path),
    help="Import the weights2weights release folder (all_weights.pt, weight_dimensions.pt, ...) instead.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="With --from-w2w-release: unpickle identity_df.pt (runs code from the file; needs pandas).",
)
@hub_option
@json_option
@click.pass_context
def ingest(
    ctx,
    dataset,
    base_model,
    recipe,
    steps,
    lr,
    seed,
    batch_identities,
    workers,
    scheduler,
    device,
    dtype,
    limit,
    push_to,
    release,
    trust_pickle,
    hub_spec,
    as_json,
):
    """Train one LoRA per identity folder of DATASET and register it (with its attributes).

    DATASET holds DATASET/<identity>/*.png|jpg and DATASET/attributes.csv (identity, then one column
    per attribute). A rerun skips identities already registered from the same images. The registry
    is created if it does not exist yet.

    \b
    w2wreg toyfaces make faces/ --identities 24
    w2wreg ingest faces/ -B 8
    w2wreg ingest celebs/ --base-model runwayml/stable-diffusion-v1-5 --recipe w2w --device cuda --workers 4
    w2wreg ingest --from-w2w-release weights2weights/files --trust-pickle

    With --from-w2w-release, a folder that also holds the authors' fitted space (mean.pt, std.pt, V.pt)
    gets it registered as the space's subspace (as `w2wreg fit --from-w2w-release` does).
    """
    if workers and scheduler:
        fail("--workers starts a local cluster and --scheduler uses a running one: pass one of them")
    from registry.registry import Registry

    reg = Registry.init(ctx.obj)  # ingest is the first thing a new user runs: it makes the registry if needed
    reg.hub = open_hub(hub_spec, reg.hub)
    if release is not None:
        if dataset is not None:
            fail("pass either DATASET or --from-w2w-release DIR, not both")
        return _release(ctx, reg, release, trust_pickle, limit, as_json)
    if dataset is None:
        fail("missing DATASET (a folder of identity folders); or pass --from-w2w-release DIR")

    from ingest.fanout import run_ingest
    from ingest.trainer import get_recipe

    rec = get_recipe(recipe, steps=steps, lr=lr, seed=seed)
    report = run_ingest(
        reg,
        dataset,
        rec,
        base_model=base_model,
        batch_identities=batch_identities,
        workers=workers,
        scheduler=scheduler,
        device=device,
        dtype=dtype,
        push_to=push_to,
        limit=limit,
        progress=not as_json,
    )
    if as_json:
        emit_json(report.to_json())
    else:
        for w in report.warnings:
            click.echo(f"warning: {w}", err=True)
        if report.skipped:
            click.echo(f"skipped {len(report.skipped)} identities already registered from the same images", err=True)
        for name, err in report.failed:
            click.echo(f"failed: {name}: {err}", err=True)
        per = report.train_seconds_per_identity
        click.echo(
            f"trained and registered {len(report.added)} model(s) on {report.base_model} in {report.seconds:.1f}s"
            + (f" ({per:.2f}s of training per identity)" if per else "")
            + (f"; pushed {len(report.pushed)}" if report.pushed else "")
        )
    if report.failed:
        ctx.exit(EXIT_ERROR)


def _release(ctx, reg, folder: Path, trust_pickle: bool, limit: int | None, as_json: bool) -> None:
    import warnings

    from ingest.w2w_release import has_basis, import_basis, import_release

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = import_release(reg, folder, trust_pickle=trust_pickle, progress=not as_json, limit=limit)
    notes = list(dict.fromkeys([*report.warnings, *(str(w.message) for w in caught)]))
    if not as_json:
        for w in notes:
            click.echo(f"warning: {w}", err=True)
        for _, err in report.errors:
            click.echo(f"error: {err}", err=True)
        click.echo(
            f"imported {len(report.added)} model(s) from the w2w release"
            + (f"; {len(report.skipped)} already registered" if report.skipped else "")
        )
    basis = None
    if report.added and not report.errors and has_basis(folder):  # the authors' space: project, edit, invert at once
        if not as_json:
            click.echo("registering the release's own space (mean.pt, std.pt, V.pt) ...", err=True)
        basis = import_basis(reg, folder, trust_pickle=trust_pickle)
    if as_json:
        emit_json({**report.to_json(), "warnings": notes, "subspace": basis})
    elif basis:
        from cli.space import report_basis

        report_basis(basis)
    if report.errors:
        ctx.exit(EXIT_ERROR)


COMMANDS = [ingest]
