"""`w2wreg hub gc`: upkeep of the repos `w2wreg serve` keeps."""

from __future__ import annotations

import click

from cli.models import open_registry
from cli.output import emit_json, json_option
from registry.hubs.gc import collect, parse_duration
from registry.hubs.store import RepoStore


@click.group()
def hub():
    """Upkeep of the repos of `w2wreg serve` (<registry>/repos).

    \b
    w2wreg hub gc --dry-run
    """


@hub.command(name="gc")
@click.option(
    "--grace",
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="Keep unreferenced objects and unreachable commits younger than this (30m, 1h, 2d; 0: none): an LFS "
    "upload whose commit is still to come, history a squash just left.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@json_option
@click.pass_context
def gc(ctx, grace, dry_run, as_json):
    """Remove what no branch or tag of any repo names any more, and what interrupted work left.

    The objects of deleted repos, squashed history, deleted branches and tags, refused commits and LFS
    uploads never committed; safe while `w2wreg serve` runs (it waits for a commit in flight).

    \b
    w2wreg hub gc --dry-run --json
    w2wreg --registry team-hub hub gc --grace 0
    """
    reg = open_registry(ctx)
    report = collect(RepoStore(reg.paths.repos), parse_duration(grace), dry_run)
    if as_json:
        emit_json(report.to_json())
        return
    verb = "would remove" if dry_run else "removed"
    mib = report.bytes_freed / (1 << 20)
    young = f"; {report.young.count} unreferenced objects younger than {grace} kept" if report.young.count else ""
    click.echo(
        f"{verb} {report.objects.count} objects, {report.commits.count} commits, {report.leftovers.count} leftovers "
        f"of interrupted work: {mib:.1f} MiB ({report.repos} repos, {report.live_objects} objects in use{young})"
    )


COMMANDS = [hub]
