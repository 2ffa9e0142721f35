"""Do the w2w phenomena appear in the toy world, and from how many identities? Edits, samples, inversions.

    python bench/bench_fidelity.py [--sizes 24,64,128,256] [--targets 12] [--samples 24] [--invert 4]
                                   [--frames shared,factors] [--samplers gaussian,population:0.5]
                                   [--strengths 2.5,4,6] [--methods mean_diff,lstsq] [--population FILE]
                                   [--direction-components 8,16,all] [--seeds 2,3,4] [--guidances 3,1]

The identities are the shipped toy population (ingest/assets/toy-population.safetensors, made by
`python -m ingest.toy_population`). For each size N the space is fitted on the population's first N
identities (k = min(1000, N - 1), as `w2wreg demo` fits), each attribute's direction on their labels (over the
space's first `cli.demo.DIRECTION_COMPONENTS` coefficients, all when None), and the attribute detector reads
each model as the demo does, by its majority over one image per seed of `ingest.shown.SEEDS` drawn at the
classifier-free guidance `ingest.shown.GUIDANCE`, for:
  edits     the first --targets identities lacking the attribute, moved by +S std of its score: how often the
            attribute appears ("success"), how often the other three stay as the unedited LoRA shows them;
  samples   --samples models drawn from the space (w2w.sampling: a Gaussian per coefficient, or
            "population:h", a smoothed bootstrap of bandwidth h whose identities are drawn in rounds, each
            one before any twice): each attribute's rate against its rate among
            the N identities' labels and among what their own LoRAs show (the same detector on the same
            noises); novelty: a sample's distance to its nearest identity over the median distance of two;
  inverted  --invert held-out faces (not in the population) inverted into the space as the demo does (100
            steps, nearest start, 4 timesteps a step): the share of their attributes the detector agrees on;
  fidelity  the edited identities' own LoRAs: how often they show their identity's attributes (a ceiling).
The frame is what the space is fitted on: "shared" (A = I, B = dW, as `w2wreg` registers toy-recipe LoRAs:
Recipe.frame) or "factors" (the trained rank-1 A and B, flattened). One table varies N at the demo's defaults
(its frame, `cli.demo.STRENGTH` debiased, `cli.demo.SAMPLE_BANDWIDTH`, w2w.directions.DEFAULT_METHOD); at the
largest N one varies the frame, one the sampler, one the strength (with a control: a random direction of the
same length), one the method (each with and without debiasing against the other three attributes) and one the
coefficients the directions are fitted over, and one the guidance the images are drawn at (edits at several
strengths, with the random-direction control), so a reader sees why the defaults are what they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_result, env_info, log, print_table  # noqa: E402


class World:
    """The population in one frame (its vectors V), the base model, and a cache of each identity's own image.

    frame "shared": the vectors as `w2wreg` registers toy-recipe LoRAs (A = I, B = dW; Recipe.registered);
    "factors": the trained rank-1 factors A, B flattened, as the asset stores them.
    """

    def __init__(
        self,
        population_path: Path | None,
        frame: str = "shared",
        seeds: tuple[int, ...] | None = None,
        guidance: float | None = None,
    ):
        from ingest import shown, toy_population
        from ingest.basemodel import load_base

        self.seeds = seeds or shown.SEEDS
        self.guidance = shown.GUIDANCE if guidance is None else guidance

        self.pop = toy_population.load(population_path or toy_population.ASSET)
        self.base = load_base(None)
        self.frame = frame
        if frame == "factors":
            self.layout, self.V = toy_population.trained_layout(self.base), self.pop.vectors
        else:
            self.layout = toy_population.toy_layout(self.base)
            self.V = toy_population.registered_vectors(self.pop.vectors, self.base)
        self._own: dict[int, dict[str, bool]] = {}

    def look(self, vectors: np.ndarray) -> dict[str, np.ndarray]:
        """What each vector's model shows (bool per attribute): the detector's majority over the seeds' images."""
        from ingest.shown import shown
        from w2w.flatten import unflatten

        loras = [unflatten(np.asarray(v, dtype=np.float32), self.layout) for v in vectors]
        return shown(self.base, loras, self.seeds, self.guidance)[0]

    def own(self, idx: list[int]) -> dict[int, dict[str, bool]]:
        todo = [i for i in idx if i not in self._own]
        if todo:
            found = self.look(self.V[todo])
            for j, i in enumerate(todo):
                self._own[i] = {a: bool(v[j]) for a, v in found.items()}
        return {i: self._own[i] for i in idx}


def fit(world: World, n: int, k: int | None = None):
    from w2w import subspace

    V = world.V[:n]
    sub = subspace.fit(subspace.ArraySource(V), subspace.FitConfig(components=min(k or 1000, n - 1)))
    return sub, sub.project(V).astype(np.float64)


def edits(
    world: World,
    n: int,
    sub,
    C: np.ndarray,
    strength: float,
    method: str,
    targets: int,
    debias: bool = False,
    components: int | None = None,
    control: bool = False,
) -> dict:
    """Edit success and kept per attribute. `control`: the same step's length in a random direction shaped like the
    identities' spread (each coefficient's std): what any weight change of that size does to the other attributes."""
    from ingest.toyfaces import ATTRIBUTES
    from w2w import directions

    Y_all = world.pop.attributes[:n].astype(np.float64)
    ds = [directions.fit_direction(C, Y_all[:, i], method, a, components) for i, a in enumerate(ATTRIBUTES)]
    if debias:  # each direction made orthogonal to the other three (`w2wreg direction fit A --debias B,C,D`)
        ds = [directions.debias(d, [o for o in ds if o is not d], C) for d in ds]
    out = {}
    for i, (a, d) in enumerate(zip(ATTRIBUTES, ds, strict=True)):
        Y = world.pop.attributes[:n, i]
        idx = [j for j in range(n) if not Y[j]][:targets]
        dc = d.step(strength)  # (k,)
        if control:
            r = np.random.default_rng(i).standard_normal(dc.shape) * C.std(0)
            dc = r * (np.linalg.norm(dc) / np.linalg.norm(r))
        step = (sub.components.astype(np.float64) @ dc) * sub.std
        after = world.look(world.V[idx] + step)
        before = world.own(idx)
        kept = [after[b][j] == before[i_][b] for j, i_ in enumerate(idx) for b in ATTRIBUTES if b != a]
        out[a] = {"success": float(after[a].mean()), "kept": float(np.mean(kept)), "targets": len(idx)}
    return out


def samples(world: World, n: int, sub, C: np.ndarray, count: int, bandwidth: float | None = None) -> dict:
    """Each attribute's rate among `count` drawn models, against the N identities' labels and what their own
    LoRAs show (the same detector on the same noises); `novelty`: mean distance of a sample to its nearest
    identity over the median distance between two identities (coefficients)."""
    from ingest.toyfaces import ATTRIBUTES
    from w2w.sampling import draw

    Cs = draw(np.random.default_rng(0), count, C.mean(0), C.std(0), fitted=C, bandwidth=bandwidth)
    found = world.look(sub.reconstruct(Cs.astype(np.float32)))
    own = world.own(list(range(n)))
    nearest = np.sqrt(((Cs[:, None] - C[None]) ** 2).sum(-1)).min(1).mean()
    pair = np.median(np.sqrt(((C[:, None] - C[None]) ** 2).sum(-1))[np.triu_indices(n, 1)])
    out = {
        a: {
            "rate": float(found[a].mean()),
            "population": float(world.pop.attributes[:n, i].mean()),
            "shown": float(np.mean([own[j][a] for j in range(n)])),
        }
        for i, a in enumerate(ATTRIBUTES)
    }
    return {"attributes": out, "novelty": float(nearest / pair)}


def inversions(world: World, sub, C: np.ndarray, faces: int, steps: int = 100) -> float:
    """The demo's inversion (cli.demo._invert_held_out) without a registry: nearest start among the N models."""
    from ingest import toyfaces
    from ingest.invert import InvertConfig, Inverter, invert, shortlist_by_loss
    from ingest.trainer import to_tensor

    base, layout, V = world.base, world.layout, sub.components
    cfg = InvertConfig(components=sub.k, steps=steps, batch_timesteps=4, init="nearest", first_pass_steps=20)
    first = InvertConfig(**{**cfg.describe(), "steps": cfg.first_pass_steps, "init": "mean"})
    agree = []
    for i, face in enumerate(toyfaces.random_faces(1000 + faces, seed=0)[1000:]):
        x = to_tensor(toyfaces.render(face, 32, np.random.default_rng(1000 + i))[None], base.resolution)
        inv = Inverter(base, layout, sub.mean, sub.std, V)
        est, _ = invert(base, layout, sub.mean, sub.std, V, x, first, inv=inv)
        near = np.argsort(((C - est) ** 2).sum(1))[: cfg.shortlist]
        cands = C[near].astype(np.float32)
        c0 = cands[shortlist_by_loss(base, layout, sub.mean, sub.std, V, x, cfg, cands, inv=inv)]
        c, _ = invert(base, layout, sub.mean, sub.std, V, x, cfg, None, c0, inv=inv)
        found = world.look(sub.reconstruct(c[None]))
        agree.append(np.mean([bool(found[a][0]) == face.has(a) for a in toyfaces.ATTRIBUTES]))
    return float(np.mean(agree)) if agree else float("nan")


def fidelity(world: World, n: int, targets: int) -> float:
    from ingest.toyfaces import ATTRIBUTES

    idx = sorted({j for i in range(len(ATTRIBUTES)) for j in np.flatnonzero(~world.pop.attributes[:n, i])[:targets]})
    own = world.own(idx)
    return float(np.mean([own[j][a] == world.pop.attributes[j, i] for j in idx for i, a in enumerate(ATTRIBUTES)]))


def row(label, e: dict | None, s: dict | None, inv: float | None, fid: float | None) -> tuple:
    e_cols = (
        (
            " ".join(f"{100 * v['success']:.0f}" for v in e.values()),
            min(v["success"] for v in e.values()),
            " ".join(f"{100 * v['kept']:.0f}" for v in e.values()),
            min(v["kept"] for v in e.values()),
        )
        if e
        else ("-",) * 4
    )
    if s:
        att = s["attributes"].values()
        s_cols = (
            " ".join(f"{100 * v['rate']:.0f}/{100 * v['population']:.0f}/{100 * v['shown']:.0f}" for v in att),
            max(abs(v["rate"] - v["population"]) for v in att),
            max(abs(v["rate"] - v["shown"]) for v in att),
            s["novelty"],
        )
    else:
        s_cols = ("-",) * 4
    return (label, *e_cols, *s_cols, inv, fid)


HEADERS = ["", "edit success % (g b s h)", "min", "kept % (g b s h)", "min",
           "samples % / labels % / LoRAs show % (g b s h)", "gap labels", "gap shown", "novelty",
           "inverted agree", "LoRA fidelity"]  # fmt: skip
EDIT_COLS, SAMPLE_COLS = [0, 1, 2, 3, 4], [0, 5, 6, 7, 8]


TABLES = (
    "frames",
    "components",
    "samplers",
    "strengths",
    "directions",
    "methods",
    "guidances",
)  # after the one by size


def pick(r: tuple, cols: list[int]) -> tuple:
    return tuple(r[c] for c in cols)


def parse_sampler(text: str) -> tuple[str, float | None]:
    """ "gaussian" -> None; "population:0.5" -> 0.5 (the bandwidth)."""
    name, _, h = text.partition(":")
    return text, (float(h) if name == "population" else None)


def by_guidance(args, world: World, n: int, seeds, strengths: list[float], K) -> dict:
    """Edits (each strength, debiased, and the random-direction control at the demo's) and what the identities'
    LoRAs show, with every image drawn at each of --guidances."""
    from cli.demo import STRENGTH
    from w2w.directions import DEFAULT_METHOD

    rows, data = [], {}
    for g in (float(x) for x in args.guidances.split(",")):
        w = world if g == world.guidance else World(args.population, world.frame, seeds, g)
        sub, C = fit(w, n)
        fid = fidelity(w, n, args.targets)
        for st in strengths:
            e = edits(w, n, sub, C, st, DEFAULT_METHOD, args.targets, True, K)
            data[f"{g:g} +{st:g}"] = {"edits": e, "lora_fidelity": fid}
            rows.append(
                (f"guidance {g:g}, +{st:g} std debiased", *pick(row("", e, None, None, fid), EDIT_COLS)[1:], fid)
            )
        e = edits(w, n, sub, C, STRENGTH, DEFAULT_METHOD, args.targets, True, K, control=True)
        data[f"{g:g} control"] = {"edits": e}
        rows.append(
            (
                f"guidance {g:g}, random direction, +{STRENGTH:g} std's length",
                *pick(row("", e, None, None, None), EDIT_COLS)[1:],
                None,
            )
        )
    print_table(
        [*pick(HEADERS, EDIT_COLS), "LoRA fidelity"], rows, title=f"by rendering guidance (N = {n}, {DEFAULT_METHOD})"
    )
    return data


def main() -> None:
    from cli.demo import DIRECTION_COMPONENTS as K
    from cli.demo import SAMPLE_BANDWIDTH, STRENGTH
    from w2w.directions import DEFAULT_METHOD

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="24,64,128,256")
    ap.add_argument("--targets", type=int, default=12, help="identities edited per attribute")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--invert", type=int, default=4, help="held-out faces inverted per size (0: none)")
    ap.add_argument("--frames", default="shared,factors", help="the first is the demo's (Recipe.frame)")
    ap.add_argument("--samplers", default="gaussian,population:0.7,population:0.5,population:0.3")
    ap.add_argument("--components", default="8,16,32", help="k of the space fitted (besides the demo's)")
    ap.add_argument("--strengths", default="2.5,4,6")
    ap.add_argument("--methods", default="mean_diff,lstsq,ridge")
    ap.add_argument(
        "--direction-components", default="4,8,32,all", help="K the directions are fitted over (besides the demo's)"
    )
    ap.add_argument("--population", type=Path)
    ap.add_argument("--tables", default=",".join(TABLES), help="which tables after the first to print")
    ap.add_argument("--seeds", help="noise seeds a model is read over (majority; odd count) [default: the demo's]")
    ap.add_argument("--guidances", default="3,1", help="classifier-free guidances compared (the last table)")
    args = ap.parse_args()
    tables = set(args.tables.split(","))
    torch.set_grad_enabled(True)
    frames = args.frames.split(",")
    seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else None
    world = World(args.population, frames[0], seeds)
    total = len(world.pop.vectors)
    sizes = sorted({min(int(s), total) for s in args.sizes.split(",")})
    demo_sampler = "gaussian" if SAMPLE_BANDWIDTH is None else f"population:{SAMPLE_BANDWIDTH:g}"
    log(f"population: {total} identities ({world.pop.sha256[:12]}); sizes {sizes}; frame {world.frame}")
    log(f"each model read over the seeds {world.seeds}")
    log(f"images drawn at guidance {world.guidance:g}")
    rows, data = [], {"sizes": {}, "frames": {}, "samplers": {}, "strengths": {}, "methods": {}, "direction_k": {}}
    for n in sizes:
        sub, C = fit(world, n)
        e = edits(world, n, sub, C, STRENGTH, DEFAULT_METHOD, args.targets, debias=True, components=K)
        s = samples(world, n, sub, C, args.samples, SAMPLE_BANDWIDTH)
        inv = inversions(world, sub, C, args.invert) if args.invert else None
        fid = fidelity(world, n, args.targets)
        data["sizes"][n] = {"edits": e, "samples": s, "inversion_agreement": inv, "lora_fidelity": fid}
        rows.append(row(f"N = {n}", e, s, inv, fid))
        log(f"N = {n}: {rows[-1]}")
    title = (
        f"by population size (frame {world.frame}; +{STRENGTH:g} std {DEFAULT_METHOD} debiased over "
        f"{f'the first {K}' if K else 'all the'} coefficients; samples {demo_sampler})"
    )
    print_table(HEADERS, rows, title=title)
    n = sizes[-1]
    if "frames" in tables:
        rows = []
        for frame in frames:
            w = world if frame == world.frame else World(args.population, frame, seeds)
            sub, C = fit(w, n)
            e = edits(w, n, sub, C, STRENGTH, DEFAULT_METHOD, args.targets, debias=True, components=K)
            s = samples(w, n, sub, C, args.samples)
            data["frames"][frame] = {"edits": e, "samples": s}
            rows.append(row(frame, e, s, None, None))
        print_table(HEADERS[:9], [r[:9] for r in rows], title=f"by frame (N = {n}; edits as above; gaussian samples)")
    if "components" in tables:
        rows = []
        for k in [int(x) for x in args.components.split(",") if x] + [n - 1]:
            sub, C = fit(world, n, k)
            e = edits(world, n, sub, C, STRENGTH, DEFAULT_METHOD, args.targets, debias=True, components=K)
            s = samples(world, n, sub, C, args.samples, SAMPLE_BANDWIDTH)
            data.setdefault("components", {})[sub.k] = {"edits": e, "samples": s}
            rows.append(row(f"k = {sub.k}", e, s, None, None))
        print_table(HEADERS[:9], [r[:9] for r in rows], title=f"by components fitted (N = {n}; as the first table)")
    sub, C = fit(world, n)
    if "samplers" in tables:
        rows = []
        for text in args.samplers.split(","):
            label, h = parse_sampler(text)
            s = samples(world, n, sub, C, args.samples, h)
            data["samplers"][label] = s
            rows.append(pick(row(label, None, s, None, None), SAMPLE_COLS))
        print_table(pick(HEADERS, SAMPLE_COLS), rows, title=f"by sampler (N = {n}, frame {world.frame})")
    if "strengths" in tables:
        rows = []
        for st in (float(x) for x in args.strengths.split(",")):
            for debias in (False, True):
                e = edits(world, n, sub, C, st, DEFAULT_METHOD, args.targets, debias, K)
                label = f"+{st:g} std" + (" debiased" if debias else "")
                data["strengths"][label] = e
                rows.append(pick(row(label, e, None, None, None), EDIT_COLS))
        e = edits(world, n, sub, C, STRENGTH, DEFAULT_METHOD, args.targets, True, K, control=True)
        data["strengths"]["control"] = e
        rows.append(pick(row(f"random direction, +{STRENGTH:g} std's length", e, None, None, None), EDIT_COLS))
        print_table(pick(HEADERS, EDIT_COLS), rows, title=f"by edit strength (N = {n}, {DEFAULT_METHOD})")
    if "directions" in tables:
        rows = []
        for text in dict.fromkeys([str(K or "all"), *args.direction_components.split(",")]):
            dk = None if text == "all" else int(text)
            e = edits(world, n, sub, C, STRENGTH, DEFAULT_METHOD, args.targets, True, dk)
            data["direction_k"][text] = e
            rows.append(pick(row(f"first {text} of {sub.k}", e, None, None, None), EDIT_COLS))
        title = f"by direction components (N = {n}, +{STRENGTH:g} std {DEFAULT_METHOD} debiased)"
        print_table(pick(HEADERS, EDIT_COLS), rows, title=title)
    if "methods" in tables:
        rows = []
        for m in args.methods.split(","):
            for debias in (False, True):
                e = edits(world, n, sub, C, STRENGTH, m, args.targets, debias, K)
                label = m + (" + debias" if debias else "")
                data["methods"][label] = e
                rows.append(pick(row(label, e, None, None, None), EDIT_COLS))
        print_table(pick(HEADERS, EDIT_COLS), rows, title=f"by direction method (N = {n}, +{STRENGTH:g} std)")
    if "guidances" in tables:
        data["guidances"] = by_guidance(args, world, n, seeds, [float(x) for x in args.strengths.split(",")], K)
    emit_result({"bench": "fidelity", "population": world.pop.sha256, **data, "env": env_info()})


if __name__ == "__main__":
    main()
