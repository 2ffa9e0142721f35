"""`w2wreg verify` and `w2wreg repair`."""

from __future__ import annotations

import click

from cli.errors import EXIT_INTEGRITY
from cli.models import open_registry
from cli.output import emit_json, json_option
from registry.integrity import repair as repair_registry
from registry.integrity import verify as verify_registry


@click.command()
@json_option
@click.pass_context
def verify(ctx, as_json):
    """Check that catalog, vectors and hub files agree (sha256 of every vector and pushed file).

    Exits 3 when something disagrees; `w2wreg repair` fixes what can be fixed.

    \b
    w2wreg verify --json
    """
    reg = open_registry(ctx)
    report = verify_registry(reg)
    if as_json:
        emit_json(report.to_json())
    else:
        for f in report.findings:
            click.echo(f"{f.kind}: {f.what}: {f.detail}" + (" (repair can fix this)" if f.fixable else ""))
        state = "ok" if report.ok else "PROBLEMS FOUND"
        click.echo(f"{state}: {report.models} models in {report.spaces} space(s), {report.hub_files} hub files checked")
    if not report.ok:
        ctx.exit(EXIT_INTEGRITY)


@click.command()
@json_option
@click.pass_context
def repair(ctx, as_json):
    """Rebuild what can be rebuilt: drop uncommitted vector rows, restore vectors and hub files, report orphans.

    A damaged vector is restored from the model's pushed hub copy when there is one; exits 3 when
    problems remain.

    \b
    w2wreg repair && w2wreg verify
    """
    reg = open_registry(ctx)
    actions = repair_registry(reg)
    after = verify_registry(reg)
    if as_json:
        emit_json({"actions": actions, "ok": after.ok})
    else:
        for a in actions:
            click.echo(a)
        click.echo("registry is consistent" if after.ok else "problems remain; see `w2wreg verify`")
    if not after.ok:
        ctx.exit(EXIT_INTEGRITY)


COMMANDS = [verify, repair]
