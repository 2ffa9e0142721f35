"""`w2wreg tour`: a short walk through every command on generated w2w-shaped LoRAs (no download, no GPU)."""

from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path

import click


@click.command()
@click.option(
    "-n", "n", type=click.IntRange(4, 100_000), default=200, show_default=True, help="How many LoRAs to generate."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Work folder (default: a new temporary folder).",
)
@click.option("--preset", type=click.Choice(["w2w", "qkvo"]), default="w2w", show_default=True)
def tour(n: int, out: Path | None, preset: str) -> None:
    """Generate n SD 1.5 LoRAs in the w2w layout (D = 99,648) and run the main commands on them:
    import, filter, search, export, push, then the w2w space: fit, project, directions, edit, mix, sample.

    \b
    w2wreg tour -n 200 --out /tmp/w2w-tour
    """
    from cli.main import cli
    from ingest.synthetic import Population
    from w2w.presets import sd15_layout

    out = Path(out or tempfile.mkdtemp(prefix="w2wreg-tour-"))
    loras, registry = out / "loras", out / "registry"
    base = "runwayml/stable-diffusion-v1-5"
    layout = sd15_layout(preset)
    click.secho(f"# generating {n} LoRAs ({layout.describe()}) in {loras}", bold=True)
    t = time.perf_counter()
    csv_path = Population(layout, seed=0).write(loras, n, formats=("diffusers", "kohya", "peft"), base_model=base)
    click.echo(
        f"  {time.perf_counter() - t:.1f}s: a third each in diffusers, kohya and PEFT format, "
        f"attributes in {csv_path.name}"
    )

    def run(*args: str) -> None:
        click.secho("\n$ w2wreg " + " ".join(shlex.quote(a) for a in args), bold=True)
        t0 = time.perf_counter()
        try:
            cli.main(["--registry", str(registry), *args], prog_name="w2wreg", standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
        click.secho(f"  ({time.perf_counter() - t0:.2f}s)", dim=True)

    run("init")
    run("add", str(loras), "--attrs-csv", str(csv_path))
    run("add", str(loras / "identity_00000.safetensors"))  # a duplicate: skipped
    run("ls", "--where", "glasses AND beard AND age > 35")
    run("show", "identity_00001")
    run("search", "--like", "identity_00001", "-k", "5")
    run("search", "--like", "identity_00001", "-k", "5", "--where", "NOT glasses", "--metric", "delta")
    run("export", "identity_00001", "--format", "peft", "-o", str(out / "export" / "identity_00001-peft"))
    run("push", "identity_00001", "--repo", "tour/identity_00001")
    run("add", "hub:tour/identity_00001")  # the same weights: skipped
    run("fit", "--components", "50")
    run("project", "identity_00001")
    run("direction", "fit", "glasses")
    run("direction", "fit", "beard", "--debias", "glasses")
    run("edit", "identity_00001", "--direction", "glasses=1.5", "--direction", "beard=-1")
    run("mix", "0.5*identity_00001 + 0.5*identity_00002 + 0.8*glasses", "--name", "blend")
    run("sample", "-n", "3", "--seed", "0")
    run("search", "--like", "blend", "-k", "3")
    run("show", "blend")
    run("verify")
    click.secho(f"\nDone. Registry: {registry}  (try `w2wreg --registry {registry} ls`)", bold=True)


COMMANDS = [tour]
