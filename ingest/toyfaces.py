"""The embedded toy-faces world: procedural faces, their captions, and datasets of them.

An identity (`Face`) is a handful of parameters (face shape, skin tone, hair colour and style, eye,
shirt and hat colours) plus binary attributes (`ATTRIBUTES`). `render` paints it with numpy masks at
4x the output size and box-downsamples (antialiasing); with an `rng` it adds a small jitter (shift,
scale, lighting) so one identity gives several distinct images. Everything is deterministic from
seeds: the same seed gives the same bytes.

Layout (face coordinates, the unit square, y down): head centred at (0.5, 0.5); eyes at y = 0.46;
mouth at 0.65; a hat's crown between about 0.04 and 0.25, where the background shows otherwise.
The attributes are big, high-contrast blocks so that they survive 32 px and a tiny diffusion model:
glasses = thick near-black frames, beard = a dark lower face (always >= 70 luminance levels darker
than the skin), smile = an open D-shaped mouth with teeth (vs a flat line), hat = a saturated block.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from w2w.errors import DatasetError

ATTRIBUTES: tuple[str, ...] = ("glasses", "beard", "smile", "hat")
ATTRIBUTE_P = 0.45  # each attribute independently present with this probability
SUPERSAMPLE = 4

# Word-level vocabulary of the embedded text encoder: every word caption() produces, plus the
# DreamBooth words. Append only: a token's id is its position.
VOCAB: list[str] = ["a", "smiling", "person", "with", "glasses", "and", "beard", "hat", "sks", "photo", "of", "face"]

BACKGROUND = (238, 236, 230)
SKIN_LIGHT, SKIN_DARK = np.array([250, 216, 192]), np.array([122, 80, 56])
HAIR_COLOURS = {
    "black": (35, 30, 30),
    "brown": (95, 60, 35),
    "chestnut": (140, 85, 45),
    "auburn": (165, 65, 30),
    "blond": (225, 195, 120),
    "grey": (170, 170, 170),
}
HAIR_STYLES = ("short", "long", "fringe", "bald")
HAIR_STYLE_P = (0.3, 0.3, 0.25, 0.15)
EYE_COLOURS = {"brown": (100, 60, 30), "blue": (50, 100, 200), "green": (50, 140, 70), "grey": (110, 120, 130)}
SHIRT_COLOURS = {
    "navy": (50, 60, 110),
    "maroon": (120, 40, 50),
    "olive": (100, 110, 50),
    "teal": (40, 110, 110),
    "charcoal": (70, 70, 75),
    "mustard": (190, 150, 50),
    "lavender": (150, 130, 190),
}
HAT_COLOURS = {
    "red": (210, 40, 40),
    "blue": (40, 80, 210),
    "green": (40, 160, 70),
    "purple": (140, 50, 180),
    "orange": (240, 140, 20),
}
FRAME_COLOUR = (25, 25, 30)
BEARD_CONTRAST = 70.0  # luminance levels between skin and beard
# render(rng=...): enough that one identity's images differ, little enough that its LoRA learns the identity
JITTER_SHIFT, JITTER_SCALE, JITTER_LIGHT, JITTER_TINT = 1.0, 0.04, (0.94, 1.04), 0.02


@dataclass(frozen=True)
class Face:
    """One toy identity: shape and colour parameters (numbers in [0, 1] or palette names) and attributes.

    Every parameter is drawn whatever the attributes, so toggling one (`with_attributes`) keeps the
    rest of the identity (a hat gets the identity's own hat colour).
    """

    name: str
    face_width: float  # 0 narrow .. 1 wide
    face_length: float  # 0 short .. 1 long
    squareness: float  # 0 elliptic .. 1 boxy jaw
    skin_tone: float  # 0 light .. 1 dark
    hair_colour: str
    hair_style: str
    eye_colour: str
    shirt_colour: str
    hat_colour: str
    attributes: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.attributes) - set(ATTRIBUTES)
        assert not unknown, f"unknown attributes {sorted(unknown)}; known: {ATTRIBUTES}"

    def has(self, attribute: str) -> bool:
        return bool(self.attributes.get(attribute, False))

    def with_attributes(self, **changes: bool) -> Face:
        """The same identity with some attributes switched, e.g. `face.with_attributes(glasses=True)`."""
        return dataclasses.replace(self, attributes={**self.attributes, **changes})

    @property
    def hair_lightness(self) -> float:
        return round(_luma(np.array(HAIR_COLOURS[self.hair_colour])) / 255.0, 3)

    def to_row(self) -> dict[str, str | bool | float]:
        """One attributes.csv row: identity, the binary attributes, then the numeric parameters."""
        return {
            "identity": self.name,
            **{a: self.has(a) for a in ATTRIBUTES},
            "skin_tone": round(self.skin_tone, 3),
            "face_width": round(self.face_width, 3),
            "face_length": round(self.face_length, 3),
            "squareness": round(self.squareness, 3),
            "hair_lightness": self.hair_lightness,
        }


def identity_name(i: int) -> str:
    return f"face-{i:04d}"


def random_faces(n: int, seed: int = 0) -> list[Face]:
    """n identities, drawn in order from one seeded generator (the first k of n are the same for any n)."""
    rng = np.random.default_rng(seed)
    faces = []
    for i in range(n):
        # Numbers stay inside (0.05, 0.95) so that no CSV column is all 0/1 (which would read as booleans).
        u = rng.uniform(0.05, 0.95, size=4)
        faces.append(
            Face(
                name=identity_name(i),
                face_width=float(u[0]),
                face_length=float(u[1]),
                squareness=float(u[2]),
                skin_tone=float(u[3]),
                hair_colour=str(rng.choice(list(HAIR_COLOURS))),
                hair_style=str(rng.choice(HAIR_STYLES, p=HAIR_STYLE_P)),
                eye_colour=str(rng.choice(list(EYE_COLOURS))),
                shirt_colour=str(rng.choice(list(SHIRT_COLOURS))),
                hat_colour=str(rng.choice(list(HAT_COLOURS))),
                attributes={a: bool(rng.random() < ATTRIBUTE_P) for a in ATTRIBUTES},
            )
        )
    return faces


def caption(face: Face) -> str:
    """E.g. 'a smiling person with glasses and a beard and a hat'; 'a person' when no attribute is present."""
    items = [w for a, w in (("glasses", "glasses"), ("beard", "a beard"), ("hat", "a hat")) if face.has(a)]
    text = "a smiling person" if face.has("smile") else "a person"
    return text + (" with " + " and ".join(items) if items else "")


# --- rendering ---------------------------------------------------------------------------------------


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, p: float = 2.0) -> np.ndarray:
    """A superellipse mask: p = 2 an ellipse, p ~ 8 a rounded rectangle."""
    return (np.abs(x - cx) / rx) ** p + (np.abs(y - cy) / ry) ** p <= 1.0


def skin_rgb(face: Face) -> np.ndarray:
    return SKIN_LIGHT + face.skin_tone * (SKIN_DARK - SKIN_LIGHT)


def beard_rgb(face: Face) -> np.ndarray:
    """The hair colour, darkened where needed to stay BEARD_CONTRAST below the skin (blond beards get darker)."""
    hair, skin = np.array(HAIR_COLOURS[face.hair_colour], dtype=float), skin_rgb(face)
    target = _luma(skin) - BEARD_CONTRAST
    return hair if _luma(hair) <= target else hair * max(target, 0.0) / _luma(hair)


def render(face: Face, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """One (size, size, 3) uint8 image; with `rng`, jittered: a shift of up to 1 px (of 32), +-4% scale, lighting."""
    S = size * SUPERSAMPLE
    shift, scale, light = np.zeros(2), 1.0, np.ones(3)
    if rng is not None:
        shift = rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, size=2) / 32  # in 32-px pixels whatever the size
        scale = rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE)
        light = rng.uniform(*JITTER_LIGHT) * rng.uniform(1 - JITTER_TINT, 1 + JITTER_TINT, size=3)
    u = (np.arange(S) + 0.5) / S
    x = (u[None, :] - 0.5 - shift[0]) / scale + 0.5  # (S, S): face coordinates of each pixel
    y = (u[:, None] - 0.5 - shift[1]) / scale + 0.5
    img = np.empty((S, S, 3), dtype=np.float32)
    img[:] = BACKGROUND

    def paint(mask: np.ndarray, rgb) -> None:
        img[mask] = rgb

    cx, cy = 0.5, 0.5
    a, b = 0.23 + 0.08 * face.face_width, 0.30 + 0.05 * face.face_length  # head half-width, half-height
    p = 2.0 + 2.5 * face.squareness
    skin, hair = skin_rgb(face), np.array(HAIR_COLOURS[face.hair_colour])
    outer = _blob(x, y, cx, cy, a + 0.03, b + 0.035, p)  # the head plus a hair's thickness
    head = _blob(x, y, cx, cy, a, b, p)

    if face.hair_style == "long":  # hair behind the head, down to the shoulders
        paint(outer | ((np.abs(x - cx) <= a + 0.03) & (y >= cy) & (y <= cy + b + 0.02)), hair)
    paint(_blob(x, y, cx, 1.08, 0.40, 0.22), SHIRT_COLOURS[face.shirt_colour])
    paint((np.abs(x - cx) <= 0.09) & (y >= cy + 0.6 * b) & (y <= 0.93), skin * 0.9)  # neck
    for side in (-1, 1):
        paint(_blob(x, y, cx + side * a, cy - 0.02, 0.035, 0.055), skin * 0.95)  # ears
    paint(head, skin)
    hairline = {"short": 0.55, "long": 0.5, "fringe": 0.36, "bald": 1.2}[face.hair_style]
    paint(outer & (y < cy - hairline * b), hair)
    if face.hair_style in ("long", "bald"):  # locks framing the face / tufts above the ears
        lo = cy + 0.08 if face.hair_style == "long" else cy - 0.04
        paint(outer & (np.abs(x - cx) > 0.82 * a) & (y > cy - 0.6 * b) & (y < lo), hair)
    paint(_blob(x, y, cx, cy + 0.06, 0.025, 0.035), skin * 0.85)  # nose

    ey = cy - 0.04
    for side in (-1, 1):
        ex = cx + side * 0.11
        paint(_blob(x, y, ex, ey, 0.048, 0.048), (245, 245, 245))
        paint(_blob(x, y, ex, ey, 0.03, 0.03), EYE_COLOURS[face.eye_colour])
        paint(_blob(x, y, ex, ey, 0.012, 0.012), (20, 20, 20))

    if face.has("beard"):
        jaw = head & ((y > cy + 0.19) | ((np.abs(x - cx) > 0.62 * a) & (y > cy + 0.02)))
        moustache = _blob(x, y, cx, cy + 0.128, 0.09, 0.016, 6)
        paint(jaw | moustache, beard_rgb(face))

    my = cy + 0.15
    if face.has("smile"):  # an open mouth: flat top, round bottom, a row of teeth
        mouth = _blob(x, y, cx, my, 0.11, 0.08) & (y >= my)
        paint(mouth, (150, 35, 45))
        paint(mouth & (y < my + 0.028), (242, 242, 236))
    else:
        paint((np.abs(x - cx) <= 0.075) & (np.abs(y - (my + 0.012)) <= 0.016), (130, 45, 50))

    if face.has("glasses"):
        frame = np.zeros_like(head)
        for side in (-1, 1):
            ex = cx + side * 0.11
            frame |= _blob(x, y, ex, ey, 0.088, 0.07, 6) & ~_blob(x, y, ex, ey, 0.056, 0.038, 6)
        frame |= (np.abs(x - cx) <= 0.03) & (np.abs(y - (ey - 0.015)) <= 0.013)  # bridge
        frame |= (np.abs(x - cx) >= 0.19) & (np.abs(x - cx) <= a + 0.01) & (np.abs(y - (ey - 0.02)) <= 0.011)
        paint(frame, FRAME_COLOUR)

    if face.has("hat"):
        hat = np.array(HAT_COLOURS[face.hat_colour])
        top, brim = cy - b - 0.12, cy - 0.65 * b
        paint(_blob(x, y, cx, (top + brim) / 2, 0.85 * a, (brim - top) / 2, 5), hat)  # crown
        paint((np.abs(y - (brim - 0.035)) <= 0.014) & (np.abs(x - cx) <= 0.85 * a), hat * 0.55)  # band
        paint(_blob(x, y, cx, brim, a + 0.07, 0.024, 8), hat * 0.85)  # brim

    img *= light
    small = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))  # box filter: antialiasing
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_set(faces: list[Face], images: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """images jittered renders of each face, (len(faces) * images, size, size, 3), face-major."""
    out = np.empty((len(faces) * images, size, size, 3), dtype=np.uint8)
    for i, face in enumerate(faces):
        rng = np.random.default_rng((seed, i))
        for j in range(images):
            out[i * images + j] = render(face, size, rng)
    return out


# --- datasets ----------------------------------------------------------------------------------------

PAD = 4  # contact-sheet margins, px
MARKER = "toyfaces.json"  # written last: a dataset with it is complete, and says how it was made


def make_dataset(root: Path, identities: int = 50, images: int = 8, seed: int = 0, size: int = 32) -> Path:
    """Write root/<face-NNNN>/<NN>.png and root/attributes.csv (the ingest dataset format); returns root.

    A root that already holds this exact dataset (same settings) is left as it is; any other non-empty
    root is refused, so two datasets never mix.
    """
    root = Path(root)
    settings = {"identities": identities, "images": images, "seed": seed, "size": size}
    assert identities >= 1 and images >= 1 and size >= 8, f"bad settings {settings}"
    if root.exists() and not root.is_dir():
        raise DatasetError(root, "is a file, not a folder", "choose a folder path for the dataset")
    if root.is_dir() and any(root.iterdir()):
        try:
            made = json.loads((root / MARKER).read_text())
        except (OSError, ValueError):
            made = None
        if made is None:
            raise DatasetError(
                root, "is not empty and is not a finished toy-faces dataset", "delete it or choose another folder"
            )
        if {k: made.get(k) for k in settings} != settings:
            raise DatasetError(
                root,
                f"holds a toy-faces dataset made with other settings ({made})",
                "delete it or choose another folder",
            )
        return root
    root.mkdir(parents=True, exist_ok=True)
    faces = random_faces(identities, seed)
    for i, face in enumerate(faces):
        folder = root / face.name
        folder.mkdir()
        rng = np.random.default_rng((seed, i))  # per identity, so identity i does not depend on n
        for j in range(images):
            Image.fromarray(render(face, size, rng)).save(folder / f"{j:02d}.png")
    write_attributes_csv(faces, root / "attributes.csv")
    (root / MARKER).write_text(json.dumps({**settings, "generator": "w2wreg toyfaces"}, indent=2) + "\n")
    return root


def write_attributes_csv(faces: list[Face], path: Path) -> Path:
    rows = [f.to_row() for f in faces]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(rows[0]))
        for row in rows:
            w.writerow([str(v).lower() if isinstance(v, bool) else v for v in row.values()])
    return path


LABEL_FONT_SIZE = 13  # px: readable at 1:1 next to 96-128 px tiles


def label_font(size: int = LABEL_FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own scalable font (no font file needed); its fixed 11 px bitmap where FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def contact_sheet(
    rows: list[tuple[str, list[np.ndarray | None]]],
    path: Path,
    scale: int = 3,
    columns: Sequence[str] | None = None,
    group: int = 0,
) -> Path:
    """A PNG grid: one row per (label, images), images upscaled nearest-neighbour, the label at the left.

    Size without `columns`: width = label width + PAD + columns * (cell + PAD), height = PAD + rows * (cell + PAD),
    where cell = the largest image side * scale and label width = the widest label + 2 * PAD.
    `columns`: a header row of column labels (a column widens to fit its label; tiles are centred).
    `group`: a wider gap after every `group` columns (e.g. 2 for before/after pairs). A None image is a blank cell.
    """
    font = label_font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(t: str) -> int:
        return int(np.ceil(probe.textlength(t, font=font)))

    label_w = max((text_w(label) for label, _ in rows), default=0) + 2 * PAD
    cell = max((max(im.shape[:2]) for _, ims in rows for im in ims if im is not None), default=8) * scale
    n_cols = max((len(ims) for _, ims in rows), default=0)
    heads = list(columns or [])[:n_cols]
    col_w = max([cell] + [text_w(h) + PAD for h in heads])
    head_h = (font.size if hasattr(font, "size") else 11) + 2 * PAD if heads else 0
    xs = [label_w + PAD + c * (col_w + PAD) + (c // group if group else 0) * 3 * PAD for c in range(n_cols)]
    width = (xs[-1] + col_w + PAD) if xs else label_w + PAD
    height = PAD + head_h + len(rows) * (cell + PAD)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, h in enumerate(heads):
        draw.text((xs[c] + col_w // 2, PAD + head_h // 2), h, fill=(20, 20, 20), font=font, anchor="mm")
    for r, (label, ims) in enumerate(rows):
        y = PAD + head_h + r * (cell + PAD)
        draw.text((PAD, y + cell // 2), label, fill=(20, 20, 20), font=font, anchor="lm")
        for c, im in enumerate(ims):
            if im is None:
                continue
            tile = Image.fromarray(np.asarray(im, dtype=np.uint8)).convert("RGB")
            tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
            sheet.paste(tile, (xs[c] + (col_w - tile.width) // 2, y + (cell - tile.height) // 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
