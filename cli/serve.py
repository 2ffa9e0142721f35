"""`w2wreg serve`: the registry as a team hub (Hugging Face protocol, the w2w API, a web page)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.errors import fail


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--token",
    "tokens",
    multiple=True,
    envvar="W2WREG_TOKEN",
    help="An operator's bearer token: reads and writes every repo (repeatable).",
)
@click.option(
    "--tokens-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Users and organizations: 'NAME TOKEN' (a user), '@ORG MEMBER ...', 'TOKEN' (an operator) per line.",
)
@click.option("--private", is_flag=True, help="Reads need a token too (by default public repos are open).")
@click.option(
    "--index-branches",
    is_flag=True,
    help="Index LoRAs pushed to any branch (by default only main's are registered; other branches are stored).",
)
@click.option(
    "--lfs",
    is_flag=True,
    help="Answer 'lfs' at preupload for large and binary files, as the Hub does (clients then use the Git LFS "
    "batch API, multipart for big files). Only for clients with HF_HUB_DISABLE_XET=1 (or without hf_xet): "
    "huggingface_hub with hf_xet sends such files through Xet, which this server does not speak (501).",
)
@click.option(
    "--lfs-part-mb",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="With --lfs: an LFS object bigger than this goes up in parts of this size (the multipart transfer).",
)
@click.option(
    "--max-upload-mb",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Largest upload: the files of one commit (decoded), or one LFS object.",
)
@click.option(
    "--registry",
    "registry_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The registry to serve (same as `w2wreg --registry DIR serve`); made if missing.",
)
@click.option(
    "--render-base",
    metavar="PATH|HUB_ID",
    help="A diffusers SD 1.x/2.x or SDXL pipeline the page draws previews on (models of the embedded toy base "
    "are always drawn on it; others on this one when their LoRA fits it).",
)
@click.option(
    "--no-previews",
    is_flag=True,
    help="Draw no previews: torch and the preview bases are never loaded; preview requests get a clear error.",
)
@click.option("--render-device", default="cpu", show_default=True, help="Where previews run: cpu, cuda, cuda:1, mps.")
@click.option("--render-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--render-max-steps",
    type=click.IntRange(1, 200),
    default=50,
    show_default=True,
    help="Most denoising steps a request may ask.",
)
@click.option(
    "--render-max-size",
    type=click.IntRange(8, 4096),
    help="Most pixels a side a request may ask (default: each base model's own resolution).",
)
@click.option(
    "--render-cache-mb", type=click.IntRange(0), default=64, show_default=True, help="Memory for rendered previews."
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.pass_context
def serve(
    ctx,
    host,
    port,
    tokens,
    tokens_file,
    private,
    index_branches,
    lfs,
    lfs_part_mb,
    max_upload_mb,
    registry_dir,
    render_base,
    no_previews,
    render_device,
    render_dtype,
    render_max_steps,
    render_max_size,
    render_cache_mb,
    log_level,
):
    """Serve the registry as a Hugging Face-protocol hub that indexes every LoRA pushed to it.

    \b
    w2wreg serve --port 8000 --tokens-file tokens.txt
    HF_ENDPOINT=http://127.0.0.1:8000 HF_TOKEN=... hf upload team/alice alice/   # a push is an ingest
    w2wreg push alice --repo team/alice --hub http://127.0.0.1:8000
    open http://127.0.0.1:8000/  (search, models, lineage, the map, previews and edit sliders); API: /api/w2w/docs
    w2wreg serve --render-base runwayml/stable-diffusion-v1-5 --render-device cuda --render-dtype fp16

    A user writes the repos of their own namespace and of their organizations', and reads a private repo
    only there. Without --token or --tokens-file an operator token is made and printed: writes always
    need one.
    """
    import logging

    import uvicorn

    from registry.registry import Registry
    from server.accounts import MIN_TOKEN, Accounts, new_token, read_tokens_file
    from server.app import create_app
    from server.previews import Limits

    if no_previews and (render_base is not None or render_device != "cpu"):
        fail("--no-previews draws nothing: drop --render-base / --render-device, or --no-previews")
    if render_base is not None or render_device != "cpu":  # (torch, which these need, loads only then)
        from ingest.basemodel import BaseModelError, check_device, resolve_base

        try:  # a missing folder or device fails now, not at the first preview
            check_device(render_device)
            if render_base is not None:
                resolve_base(render_base)
        except BaseModelError as e:
            fail(str(e).replace("--base-model", "--render-base").replace("--device", "--render-device"))
    known = read_tokens_file(tokens_file) if tokens_file else Accounts()
    for t in tokens:
        if len(t) < MIN_TOKEN:
            fail(f"a --token must have at least {MIN_TOKEN} characters")
        known.add_operator(t)
    if not known.tokens:
        t = new_token()
        known.add_operator(t)
        click.echo(f"operator token (pass --token or --tokens-file to choose your own): {t}", err=True)
    if no_previews:
        previewer = None
    else:
        from ingest.preview import Previewer

        previewer = Previewer(render_base, render_device, render_dtype)
    limits = Limits(
        default_steps=min(Limits.default_steps, render_max_steps),
        max_steps=render_max_steps,
        max_size=render_max_size,
        cache_bytes=render_cache_mb << 20,
    )
    reg = Registry.init(registry_dir or ctx.obj)  # serving an empty registry is how a team hub starts
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(
        reg,
        known,
        private=private,
        max_upload=max_upload_mb << 20,
        index_branches=index_branches,
        lfs=lfs,
        renderer=previewer,
        render_limits=limits,
    )
    app.state.w2w.lfs_part_size = lfs_part_mb << 20
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
    server = uvicorn.Server(config)
    click.echo(f"w2wreg hub for {reg.root} on http://{host}:{port}/  (API docs: /api/w2w/docs)", err=True)
    click.echo(f"previews drawn on {previewer.describe()}" if previewer else "no previews (--no-previews)", err=True)
    server.run()


COMMANDS = [serve]
