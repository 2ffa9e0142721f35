"""`w2wreg demo`: the whole tool on the embedded toy-faces world, with real training (no download, no GPU)."""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from pathlib import Path

import click
import numpy as np

EDITS = ("glasses", "beard", "smile", "hat")
# identities: trained live, beside the shipped toy population (ingest/toy_population.py) that carries the
# statistics; steps None: the recipe's. targets: identities lacking an attribute edited per direction (the live
# ones first); samples: models drawn from the space, their attribute rates compared with the population's (96:
# 48 drawn from 240 identities put a rate +-6.4 points, one sd, from the sampler's own, a third of the 15 allowed;
# README, "224 identities").
FULL = {"identities": 16, "images": 8, "steps": None, "held_out": 10, "invert_steps": 100, "targets": 24, "samples": 96}
QUICK = {"identities": 8, "images": 4, "steps": 30, "held_out": 2, "invert_steps": 15, "targets": 3, "samples": 8}
STRENGTH = 3.5  # standard deviations of the attribute's score: bench/bench_fidelity.py's best trade-off (guidance 1)
# directions over all the space's coefficients (None), not its first K (`direction fit --components`): over 112
# identities a class-mean difference is mostly noise beyond the first ~16, yet fitted over 8 or 16 the edits made
# the attribute appear less and kept no more (bench/bench_fidelity.py, "by direction components")
DIRECTION_COMPONENTS: int | None = None
# samples: a smoothed bootstrap of the fitted identities (w2w.sampling; None: Gaussian). Its noise blurs what an
# identity shows like any weight change of its size: 0.3 keeps the attribute rates of what the identities show
# (bench/bench_fidelity.py, "by sampler"), a sample 0.22 of the typical distance between two identities from its nearest
SAMPLE_BANDWIDTH: float | None = 0.3
PAIRS = 4  # before | after pairs per row of the contact sheet (8 columns)
RAMP = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)  # strengths (std) of the sheet's ramp: one identity per direction


@click.command()
@click.option(
    "--identities",
    "-n",
    type=click.IntRange(6, 10_000),
    help=f"Identities to train live  [default: {FULL['identities']}]",
)
@click.option("--images", type=click.IntRange(1, 64), help="Images per identity  [default: 8]")
@click.option("--steps", type=click.IntRange(1), help="Training steps per identity (default: the toy recipe's).")
@click.option("--batch-identities", "-B", type=click.IntRange(1), default=8, show_default=True)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Work folder (default: a new temporary folder)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the toy identities.")
@click.option(
    "--population",
    type=click.IntRange(0),
    help="Identities of the shipped toy population to import beside the live ones (0: none)  [default: all]",
)
@click.option(
    "--quick",
    is_flag=True,
    help=f"A smoke run in about a minute: {QUICK['identities']} identities, {QUICK['images']} images, "
    f"{QUICK['steps']} steps, {QUICK['held_out']} inversions of {QUICK['invert_steps']} steps (what CI runs).",
)
def demo(
    identities: int | None,
    images: int | None,
    steps: int | None,
    batch_identities: int,
    out: Path | None,
    seed: int,
    population: int | None,
    quick: bool,
) -> None:
    """Make a toy-faces dataset, train one LoRA per identity, import the shipped toy population beside them,
    fit the w2w space, search, sample, edit and invert held-out faces, and draw it all on a contact sheet
    (OUT/demo.png) with the figures the attribute detector measures (OUT/summary.json).

    \b
    w2wreg demo --out /tmp/w2w-demo
    w2wreg demo --identities 12 --steps 60     # a quicker look
    w2wreg demo --quick                        # does everything work? (about a minute)
    """
    from cli.main import cli
    from ingest import toyfaces

    t_start = time.perf_counter()
    given = {"identities": identities, "images": images, "steps": steps}
    preset = {**(QUICK if quick else FULL), **{k: v for k, v in given.items() if v is not None}}
    identities, images, steps = preset["identities"], preset["images"], preset["steps"]
    out = Path(out or tempfile.mkdtemp(prefix="w2wreg-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    faces_dir, registry = out / "faces", out / "registry"
    if registry.exists():
        from cli.errors import fail

        fail(f"{out} already holds a demo (its registry/); pass a new --out or delete it")

    def run(*args: str) -> None:
        click.secho("\n$ w2wreg " + " ".join(shlex.quote(str(a)) for a in args), bold=True)
        t0 = time.perf_counter()
        try:
            cli.main(["--registry", str(registry), *map(str, args)], prog_name="w2wreg", standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
        click.secho(f"  ({time.perf_counter() - t0:.1f}s)", dim=True)

    run("toyfaces", "make", faces_dir, "--identities", identities, "--images", images, "--seed", seed)
    t0 = time.perf_counter()
    run("ingest", faces_dir, "-B", batch_identities, *(("--steps", steps) if steps else ()))
    ingest_s = time.perf_counter() - t0
    if population != 0:
        run("toyfaces", "population", *(("--limit", population) if population else ()))
    from registry.registry import Registry

    n_models = len(Registry.open(registry).ls())
    run("fit", "--components", min(1000, n_models - 1))
    first = toyfaces.identity_name(0)
    run("search", "--like", first, "-k", "3", "--metric", "w2w", "--where", "kind = 'trained'")
    fitted = []
    for a in EDITS:
        # debiased against the other three (bench/bench_fidelity.py: more edits succeed and more is kept);
        # plain where another attribute has too few identities to fit; none where this one has
        for extra in (("--debias", ",".join(b for b in EDITS if b != a)), ()):
            try:
                k = ("--components", DIRECTION_COMPONENTS) if DIRECTION_COMPONENTS else ()
                run("direction", "fit", a, *extra, *k)
                fitted.append(a)
                break
            except SystemExit:
                continue
        else:
            click.secho(f"  (no {a} direction with this few identities: its edits are left out)", dim=True)
    if fitted:
        run("edit", first, *[x for a in fitted[:2] for x in ("--direction", f"{a}=1")])
    run(
        "sample",
        "-n",
        preset["samples"],
        "--seed",
        "0",
        *(("--bandwidth", SAMPLE_BANDWIDTH) if SAMPLE_BANDWIDTH else ()),
    )
    run("verify")

    click.secho("\n# generating images of the models and scoring them with the attribute detector", bold=True)
    summary = _pictures(registry, faces_dir, out, ingest_s, preset)
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    click.secho(f"\nContact sheet: {out / 'demo.png'}   Registry: {registry}", bold=True)


def _pictures(registry: Path, faces_dir: Path, out: Path, ingest_s: float, preset: dict) -> dict:
    from tqdm.auto import tqdm

    from ingest import toyfaces
    from ingest.basemodel import load_base
    from ingest.dataset import load_dataset, load_images
    from ingest.generate import generate
    from ingest.shown import GUIDANCE, SEEDS, shown
    from registry import edits
    from registry.registry import Registry
    from w2w.flatten import unflatten

    n_ids, held_out, invert_steps = preset["identities"], preset["held_out"], preset["invert_steps"]
    reg = Registry.open(registry)
    base = load_base(None)
    data = {d.name: d for d in load_dataset(faces_dir)}
    names = sorted(data)
    truth = {n: {a: bool(data[n].attributes[a]) for a in toyfaces.ATTRIBUTES} for n in names}
    seed = SEEDS[0]  # the same noise for every model: differences between pictures are differences between models

    def look(lora) -> np.ndarray:
        return generate(base, lora, n=1, seed=seed, guidance=GUIDANCE)[0]

    # what each model shows: the detector's majority over one image per seed (ingest.shown), and its image
    verdict: dict[str, dict[str, bool]] = {}
    gen: dict[str, np.ndarray] = {}

    def read(models: list[str], what: str) -> None:
        todo = [m for m in dict.fromkeys(models) if m not in verdict]
        if not todo:
            return
        found, images = shown(base, [reg.lora(m) for m in tqdm(todo, desc=what, unit="model", leave=False)])
        for i, m in enumerate(todo):
            verdict[m], gen[m] = {a: bool(v[i]) for a, v in found.items()}, images[i]

    # every identity once: how faithfully its LoRA reproduces its attributes
    read(names, "identities")
    fidelity = {a: float(np.mean([verdict[n][a] == truth[n][a] for n in names])) for a in truth[names[0]]}

    # the shipped population's identities (registered beside the live ones): labels from the registry
    pop = sorted(m.name for m in reg.ls(where="kind = 'trained'") if m.name not in data)
    truth |= {m.name: {a: bool(m.attributes.get(a)) for a in toyfaces.ATTRIBUTES} for m in map(reg.get, pop)}

    # edits: identities that lack the attribute get it (+STRENGTH std); the others must stay
    edit_rows, success, kept, n_targets = {}, {}, {}, {}
    fitted = {d["attribute"] for d in edits.list_directions(reg)}  # the current subspace's
    for a in [a for a in EDITS if a in fitted]:
        targets = [n for n in names + pop if not truth[n][a]][: preset["targets"]]
        made = [edits.edit(reg, n, {a: STRENGTH}, name=f"{n}.demo+{a}")["name"] for n in tqdm(targets, desc=f"+{a}")]
        read(targets + made, f"+{a} before and after")
        others = [(n, e, b) for n, e in zip(targets, made, strict=True) for b in toyfaces.ATTRIBUTES if b != a]
        success[a] = round(float(np.mean([verdict[e][a] for e in made])) if made else 0.0, 3)
        kept[a] = round(float(np.mean([verdict[e][b] == verdict[n][b] for n, e, b in others])) if made else 0.0, 3)
        n_targets[a] = len(targets)
        edit_rows[a] = [(n, gen[e]) for n, e in zip(targets, made, strict=True)]

    samples = [m for m in reg.ls() if m.kind == "sample"]
    read([m.name for m in samples], "samples")
    sample_rates = (
        {a: round(float(np.mean([verdict[m.name][a] for m in samples])), 3) for a in toyfaces.ATTRIBUTES}
        if samples
        else {}
    )
    population_rates = {a: round(float(np.mean([truth[n][a] for n in truth])), 3) for a in toyfaces.ATTRIBUTES}
    gap = max((abs(sample_rates[a] - population_rates[a]) for a in sample_rates), default=0.0)
    # what the registered identities' own LoRAs show (the same detector on the same noises): the population's
    # rate comparable with the samples', since no LoRA shows every attribute of its identity (lora_attribute_fidelity)
    read(list(truth), "identities shown")
    shown_rates = {a: round(float(np.mean([verdict[n][a] for n in truth])), 3) for a in toyfaces.ATTRIBUTES}
    gap_shown = max((abs(sample_rates[a] - shown_rates[a]) for a in sample_rates), default=0.0)
    n_samples, samples = len(samples), samples[:PAIRS]

    def nearest_identity(ref) -> str:
        """The trained identity nearest by weights in the w2w space (samples and edits are registered too: not
        them). By l2 on the raw vectors one low-norm identity is everyone's nearest (README, "Search")."""
        return reg.search(ref, k=1, where="kind = 'trained'", metric="w2w").hits[0].model.name

    base_imgs = [generate(base, None, prompt="a person", n=1, seed=s, guidance=GUIDANCE)[0] for s in range(2 * PAIRS)]
    held_imgs, inverted_imgs, inv_agree = _invert_held_out(reg, base, n_ids, held_out, invert_steps)
    shown_ids = names[:PAIRS]
    train_imgs = {n: load_images(data[n].images[:1], 32)[0] for n in shown_ids}

    # the sheet's rows: (label, [(what the cell shows, image), ...]); pairs fill the sheet's 2-column groups
    def pair(left: str, right: str) -> list:
        for name in (left, right):  # a registered identity not drawn yet (e.g. a population's nearest)
            if name not in look_up:
                look_up[name] = look(reg.lora(name))
        return [(left, look_up[left]), (right, look_up[right])]

    look_up = dict(gen)
    look_up |= {f"training image of {n}": train_imgs[n] for n in shown_ids}
    rows = [
        ("identities: training image | its LoRA", [c for n in shown_ids for c in pair(f"training image of {n}", n)]),
        ("identity | nearest by weights (w2w)", [c for n in shown_ids for c in pair(n, nearest_identity(n))]),
        ("sample | nearest identity", [c for m in samples for c in pair(m.name, nearest_identity(m))]),
        ("base model: 'a person'", [(f"base model, seed {s}", im) for s, im in enumerate(base_imgs)]),
    ]
    for a in EDITS:
        if a not in edit_rows:
            continue
        look_up |= {f"{n}.demo+{a}": img for n, img in edit_rows[a]}
        label = f"identity | +{a} ({STRENGTH:g} std)"
        rows.append((label, [c for n, _ in edit_rows[a][:PAIRS] for c in pair(n, f"{n}.demo+{a}")]))
        n = edit_rows[a][0][0]  # one identity that lacks it: the edit at growing strength
        layout = reg.layout(reg.get(n).space_id)
        ramp = [look(unflatten(v.astype(np.float32), layout)) for v in edits.edit_vectors(reg, n, {a: 1.0}, RAMP[1:])]
        cells = [(n, gen[n])] + [
            (f"{n} +{a} {t:g} std (not registered)", im) for t, im in zip(RAMP[1:], ramp, strict=True)
        ]
        rows.append((f"{n} +{a}: {RAMP[0]:g} to {RAMP[-1]:g} std", cells))
    held = [(f"held-out face {i}", im) for i, im in enumerate(held_imgs)]
    inverted = [(f"held-out face {i} inverted", im) for i, im in enumerate(inverted_imgs)]
    rows.append(("held-out face | inverted into the space", [c for p in zip(held, inverted, strict=True) for c in p]))
    toyfaces.contact_sheet([(label, [im for _, im in cells]) for label, cells in rows], out / "demo.png", group=2)
    per_identity = reg.catalog.lineage(reg.get(names[0]).id)[0]["params"].get("seconds")
    return {
        "identities": n_ids,
        "population_identities": len(pop),
        "ingest_seconds": round(ingest_s, 1),
        "train_seconds_per_identity": per_identity,
        "lora_attribute_fidelity": fidelity,
        "measured_seeds": list(SEEDS),
        "render_guidance": GUIDANCE,
        "edit_strength_std": STRENGTH,
        "direction_components": DIRECTION_COMPONENTS,
        "edit_success_rate": success,
        "edit_other_attributes_kept": kept,
        "edit_targets": n_targets,
        "inversion_attribute_agreement": inv_agree,
        "inversion_faces": held_out,
        "inversion_steps": invert_steps,
        "samples": n_samples,
        "samples_attributes": sample_rates,
        "population_attributes": population_rates,
        "samples_largest_gap": round(gap, 3),
        "population_shown_attributes": shown_rates,
        "samples_largest_gap_shown": round(gap_shown, 3),
        "sample_bandwidth": SAMPLE_BANDWIDTH,
        "sheet": [{"row": label, "cells": [what for what, _ in cells]} for label, cells in rows],
    }


def _invert_held_out(reg, base, n_ids: int, held_out: int, steps: int) -> tuple[list, list, float]:
    """Render faces the registry never saw, invert each into the space, and look at the result."""
    from ingest import toyfaces
    from ingest.invert import InvertConfig, invert, nearest_start
    from ingest.shown import shown
    from ingest.trainer import to_tensor
    from registry import wspace
    from w2w.flatten import unflatten

    sm = wspace.require(reg, wspace.pick_space(reg, None))
    layout = reg.layout(sm.space_id)
    cfg = InvertConfig(
        components=sm.sub.k, steps=steps, batch_timesteps=4, init="nearest", first_pass_steps=min(20, steps)
    )
    V = sm.sub.components
    held, inverted, agree = [], [], []
    from tqdm.auto import tqdm

    faces = toyfaces.random_faces(n_ids + held_out, seed=0)[n_ids:]
    for i, face in enumerate(tqdm(faces, desc="inverting held-out faces", unit="face")):
        img = toyfaces.render(face, 32, np.random.default_rng(1000 + i))
        x = to_tensor(img[None], base.resolution)
        c0, _ = nearest_start(reg, sm, base, layout, x, cfg)
        c, _ = invert(base, layout, sm.sub.mean, sm.sub.std, V, x, cfg, None, c0)
        found, gen = shown(base, [unflatten((sm.sub.mean + sm.sub.std * (V @ c)).astype(np.float32), layout)])
        agree.append(np.mean([bool(found[a][0]) == face.attributes[a] for a in toyfaces.ATTRIBUTES]))
        held.append(img)
        inverted.append(gen[0])
    return held, inverted, round(float(np.mean(agree)), 3)


def _print_summary(s: dict) -> None:
    click.secho("\n# measured", bold=True)
    click.echo(
        f"training: {s['identities']} identities in {s['ingest_seconds']}s "
        f"({s['train_seconds_per_identity']}s of training per identity), beside "
        f"{s['population_identities']} of the shipped toy population"
    )
    click.echo(
        f"every model read as the detector's majority over images of seeds {s['measured_seeds']} "
        f"(guidance {s['render_guidance']:g})"
    )
    click.echo(
        "LoRA reproduces its identity's attributes (detector on generated images): "
        + ", ".join(f"{a} {100 * v:.0f}%" for a, v in s["lora_attribute_fidelity"].items())
    )
    click.echo(
        f"edits at {s['edit_strength_std']} std (directions over "
        + (f"the first {s['direction_components']}" if s["direction_components"] else "all the")
        + " coefficients): attribute appears / other attributes kept"
    )
    for a in s["edit_success_rate"]:
        click.echo(
            f"  +{a:8s} {100 * s['edit_success_rate'][a]:5.0f}% / {100 * s['edit_other_attributes_kept'][a]:5.0f}%"
        )
    if s["samples_attributes"]:
        click.echo(
            f"{s['samples']} samples show the attributes at (the registered identities' own LoRAs show them at; "
            "their labels say): "
            + ", ".join(
                f"{a} {100 * v:.0f}% ({100 * s['population_shown_attributes'][a]:.0f}%; "
                f"{100 * s['population_attributes'][a]:.0f}%)"
                for a, v in s["samples_attributes"].items()
            )
        )
        click.echo(
            f"  largest gap: {100 * s['samples_largest_gap_shown']:.0f} points from what the identities show, "
            f"{100 * s['samples_largest_gap']:.0f} from their labels"
        )
    click.echo(
        f"{s['inversion_faces']} held-out faces inverted into the space ({s['inversion_steps']} steps): the detector "
        f"agrees with {100 * s['inversion_attribute_agreement']:.0f}% of their attributes"
    )
    click.echo(f"total {s['total_seconds']}s")


COMMANDS = [demo]
