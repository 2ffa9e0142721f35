"""Commands of the w2w space: fit, project, sample (directions, edit and mix live in cli/edits.py)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.models import open_registry
from cli.output import emit_json, json_option, table
from registry import wspace
from w2w.fit_plan import GB, physical_memory
from w2w.subspace import FitConfig


@click.command(name="fit")
@click.option("--space", "space_id", help="Space id (needed only when the registry has several).")
@click.option(
    "--components",
    "-k",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Principal components to keep (capped at the number of models - 1).",
)
@click.option("--where", help="Fit on the models matching this condition only (all models are projected).")
@click.option("--scheduler", metavar="ADDRESS", help="Run the passes on a Dask cluster (e.g. tcp://host:8786).")
@click.option(
    "--max-memory-gb",
    type=click.FloatRange(min=0.1),
    help="Peak memory budget of the fit: above it the Krylov basis goes to disk (default: 3/4 of this machine's RAM).",
)
@click.option(
    "--out-of-core/--in-memory",
    "out_of_core",
    default=None,
    help="Force the Krylov basis and the components on disk (or in RAM); default: chosen by --max-memory-gb.",
)
@click.option(
    "--device",
    help="Run the fit's products in torch on this device (cuda, cuda:1, cpu); default: numpy on the CPU.",
)
@click.option(
    "--from-w2w-release",
    "release",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="No fit: register the paper's own space (mean.pt, std.pt, V.pt of its release; all components unless -k).",
)
@click.option("--trust-pickle", is_flag=True, help="With --from-w2w-release: see `w2wreg ingest --help`.")
@json_option
@click.pass_context
def fit_cmd(
    ctx, space_id, components, where, scheduler, max_memory_gb, out_of_core, device, release, trust_pickle, as_json
):
    """Fit a new, versioned w2w subspace (z-scored PCA) over a space's models, streaming the vectors.

    \b
    w2wreg fit --components 1000
    w2wreg fit --where "kind = 'imported'" --scheduler tcp://127.0.0.1:8786
    w2wreg fit -k 10000 --max-memory-gb 8 --device cuda  # the paper's k, basis on disk, products on a GPU
    w2wreg fit --from-w2w-release weights2weights/files     # the paper's 10,000 components, as published
    """
    reg = open_registry(ctx)
    if release is not None:
        from ingest.w2w_release import import_basis

        if space_id or where or scheduler or device or out_of_core is not None or max_memory_gb:
            raise click.UsageError("--from-w2w-release takes no --space, --where, --scheduler or fit options")
        given = ctx.get_parameter_source("components") is not click.core.ParameterSource.DEFAULT
        info = import_basis(reg, release, components=components if given else None, trust_pickle=trust_pickle)
        emit_json(info) if as_json else report_basis(info)
        return
    if device and scheduler:
        raise click.UsageError("--device runs the passes here: it takes no --scheduler")
    budget = max_memory_gb if max_memory_gb is not None else 0.75 * physical_memory() / GB
    cfg = FitConfig(components=components, max_memory_gb=budget, out_of_core=out_of_core, device=device)
    say = None if as_json else lambda m: click.echo(f"  {m}", err=True)
    info = wspace.fit_space(reg, space_id, components, where, scheduler, config=cfg, say=say)
    if as_json:
        emit_json(info)
        return
    click.echo(
        f"fitted {info['subspace']} on {info['n_models']} models of space {info['space']}: "
        f"k = {info['k']}, {100 * info['explained_variance_ratio']:.1f}% of the variance, "
        f"{info['passes']} passes in {info['fit_seconds']:.1f}s"
    )


def report_basis(info: dict) -> None:
    click.echo(
        f"registered the w2w release's space as {info['subspace']} in space {info['space']}: k = {info['k']}, "
        f"{100 * info['explained_variance_ratio']:.1f}% of the variance of its {info['n_models']} models"
    )


@click.command()
@click.argument("model")
@click.option("-n", "n_coeffs", type=int, default=8, show_default=True, help="Coefficients to print (text output).")
@json_option
@click.pass_context
def project(ctx, model, n_coeffs, as_json):
    """A model's coordinates in the w2w space, its reconstruction error and its nearest models.

    \b
    w2wreg project alice --json
    """
    reg = open_registry(ctx)
    m = reg.get(model)
    sm = wspace.require(reg, m.space_id)
    c = wspace.coefficients(reg, sm, [m.id])[0]
    info = wspace.projection_info(reg, m.id) or {}
    near = reg.search(m, k=5, metric=wspace.W2W_METRIC).hits  # who is alike in this space (README, "Search")
    out = {
        "model": m.name,
        "subspace": sm.id,
        "k": sm.sub.k,
        "coefficients": c.tolist(),
        "relative_error": info.get("relative_error"),
        "well_explained": info.get("well_explained"),
        "fitted_p95": info.get("fitted_p95"),
        "nearest": [{"name": h.model.name, "distance": h.distance} for h in near],
        "nearest_metric": wspace.W2W_METRIC,
    }
    if as_json:
        emit_json(out)
        return
    click.echo(f"{m.name} in {sm.id} (k = {sm.sub.k})")
    click.echo(
        "  coefficients  " + " ".join(f"{x:+.3f}" for x in c[:n_coeffs]) + (" ..." if sm.sub.k > n_coeffs else "")
    )
    verdict = "well explained" if out["well_explained"] else "POORLY explained: consider `w2wreg fit`"
    click.echo(f"  rel. error    {out['relative_error']:.4f}  (fitted models' p95 {out['fitted_p95']:.4f}; {verdict})")
    table(["nearest (w2w)", "1 - cos"], [(h["name"], h["distance"]) for h in out["nearest"]])


@click.command()
@click.option("-n", "n", type=click.IntRange(1, 10_000), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Scales every coefficient's spread.")
@click.option(
    "--bandwidth",
    type=click.FloatRange(0, 1, min_open=True),
    help="Draw near the fitted models instead: a random one's coefficients, shrunk by sqrt(1 - h^2), plus "
    "h times each coefficient's spread of noise (1: the Gaussian; smaller: closer to real identities).",
)
@click.option("--name", "prefix", default="sample", show_default=True, help="Name prefix of the new models.")
@click.option("--space", "space_id")
@json_option
@click.pass_context
def sample_cmd(ctx, n, seed, temperature, bandwidth, prefix, space_id, as_json):
    """Sample new models from the w2w space (an independent Gaussian per coefficient, as the paper; or, with
    --bandwidth, a smoothed bootstrap of the fitted models, which keeps attributes two-sided).

    The same seed, temperature, bandwidth and subspace draw the same models: a draw already registered is
    kept, not added twice.

    \b
    w2wreg sample -n 5 --seed 0 --temperature 0.8
    w2wreg sample -n 24 --bandwidth 0.5
    """
    reg = open_registry(ctx)
    made = wspace.sample(reg, n, seed, temperature, prefix, space_id, bandwidth=bandwidth)
    if as_json:
        emit_json(made)
        return
    for m in made:
        if m["existing"]:
            click.echo(f"kept {m['name']} (id {m['id']}): this draw is already registered")
        else:
            click.echo(f"added {m['name']} (id {m['id']})")


COMMANDS = [fit_cmd, project, sample_cmd]
