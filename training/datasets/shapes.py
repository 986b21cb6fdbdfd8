"""The built-in `shapes` dataset: one coloured shape per image, and its analyser.

The grammar is fixed by ARCHITECTURE.md ("The shapes dataset") because it is our benchmark
of text conditioning: evaluation draws prompts from it and reads generated images back with
`analyse`. Image `i` is drawn from `random.Random(i)` alone, so it is identical at every
call, in every process, and its facts and caption do not depend on the image size.
"""

from __future__ import annotations

import random
import re
from collections import deque

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from training.datasets.base import DatasetError, check_split

# Foreground and background palettes (RGB), exactly as the grammar lists them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLOURS: list[str] = list(PALETTE)
BACKGROUNDS: list[str] = list(BACKGROUND_RGB)
SHAPES: list[str] = ["circle", "square", "triangle"]
SIZES: list[str] = ["small", "large"]
POSITIONS: list[str] = ["top left", "top right", "bottom left", "bottom right", "center"]
FACT_KEYS = ("colour", "shape", "position", "background", "size")

SIZE_FRACTION = {"small": 0.3, "large": 0.55}  # bounding-box side / image side
POSITION_CENTRE = {  # bounding-box centre as fractions of (width, height)
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
JITTER = 0.04  # the largest shift of the centre, as a fraction of the image side
PARAPHRASE_PROB = 0.3
# Training split only (validation and `render` stay the grammar above):
# - a share of captions name a random non-empty subset of the facts ("a red circle"), so
#   an underspecified prompt follows what it says and samples the rest;
# - geometry varies: continuous sizes, more jitter and three rasterisations, so the model
#   is not tied to one renderer's exact pixels.
PARTIAL_PROB = 0.5
VARIED_SIZE = {"small": (0.24, 0.36), "large": (0.48, 0.62)}  # side / image side, uniform
VARIED_JITTER = 0.08
SUPERSAMPLE = 4  # the anti-aliased and sub-pixel rasterisations draw at 4x
MIN_SIZE, MAX_SIZE = 8, 64
TRAIN_SIZE = 50_000
VAL_START, VAL_SIZE = 1_000_000, 2_000

Facts = dict[str, str | None]

# The three caption forms; `{position}` is "center" or e.g. "top left".
TEMPLATES = (
    "a {size} {colour} {shape} in the {position} on a {background} background",
    "{colour} {shape}, {size}, {position}, {background} background",
    "a {colour} {shape} on {background}, {size}, {position}",
)


def _alternatives(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in words)


_CAPTION_RES = [
    re.compile(
        "^"
        + t.format(**{
            "size": f"(?P<size>{_alternatives(SIZES)})",
            "colour": f"(?P<colour>{_alternatives(COLOURS)})",
            "shape": f"(?P<shape>{_alternatives(SHAPES)})",
            "position": f"(?P<position>{_alternatives(POSITIONS)})",
            "background": f"(?P<background>{_alternatives(BACKGROUNDS)})",
        })
        + "$"
    )
    for t in TEMPLATES
]


def make_prompt(colour: str, shape: str, position: str, size: str, background: str,
                form: int = 0) -> str:
    """The caption of these facts in caption form `form` (0: the template, 1-2: paraphrases)."""
    facts = {"colour": colour, "shape": shape, "position": position, "size": size,
             "background": background}
    for key, vocab in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS),
                       ("size", SIZES), ("background", BACKGROUNDS)):
        if facts[key] not in vocab:
            raise DatasetError(f"{key} must be one of {vocab}, got {facts[key]!r}")
    if form not in range(len(TEMPLATES)):
        raise DatasetError(f"caption form must be 0, 1 or 2, got {form!r}")
    return TEMPLATES[form].format(**facts)


def parse_caption(caption: str) -> Facts:
    """The facts stated by a caption in any of the three forms of the grammar.

    Raises DatasetError when the caption is not in the grammar.
    """
    text = " ".join(caption.strip().split())
    for pattern in _CAPTION_RES:
        m = pattern.match(text)
        if m:
            return {k: m.group(k) for k in FACT_KEYS}
    raise DatasetError(f"caption {caption!r} is not in the shapes grammar; expected e.g. "
                       f"{TEMPLATES[0]!r} or one of its two paraphrases")


def _draw_facts(rng: random.Random) -> tuple[Facts, float, float, int]:
    """Draw the facts, the centre jitter (fractions of the side) and the caption form."""
    facts: Facts = {
        "colour": rng.choice(COLOURS),
        "shape": rng.choice(SHAPES),
        "position": rng.choice(POSITIONS),
        "background": rng.choice(BACKGROUNDS),
        "size": rng.choice(SIZES),
    }
    jx, jy = rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)
    form = 0
    if rng.random() < PARAPHRASE_PROB:
        form = rng.choice((1, 2))
    return facts, jx, jy, form


def _triangle_rows(d: int) -> list[int]:
    """Row widths of an upward isosceles triangle in a d x d box, symmetric to the pixel.

    Widths keep the parity of `d` so the triangle is mirror-symmetric about the box's
    centre (Pillow's polygon leans one way at even sizes); row r spans the triangle's
    width at the row's lower edge, r + 1, rounded up to that parity.
    """
    return [r + 1 + (r + 1 - d) % 2 for r in range(d)]


def render(index: int, image_size: int, varied: bool = False
           ) -> tuple[np.ndarray, str, Facts]:
    """Draw image `index` of the shapes dataset: (uint8 [H, W, 3], caption, facts).

    `varied` (the training split) draws the same facts with varied geometry: a continuous
    size within the size's band, up to `VARIED_JITTER` of centre jitter, and one of three
    rasterisations chosen by the index — the grammar's pixel-exact one, a hard-edged one
    at sub-pixel coordinates, or an anti-aliased one (edges blended with the background).
    """
    if not MIN_SIZE <= image_size <= MAX_SIZE:
        raise DatasetError(f"shapes image_size must be in {MIN_SIZE}..{MAX_SIZE}, got {image_size}")
    s = image_size
    facts, jx, jy, form = _draw_facts(random.Random(index))
    caption = TEMPLATES[form].format(**facts)
    fx, fy = POSITION_CENTRE[facts["position"]]
    if varied:
        rng = random.Random(f"geometry:{index}")
        frac = rng.uniform(*VARIED_SIZE[facts["size"]])
        jx, jy = rng.uniform(-VARIED_JITTER, VARIED_JITTER), rng.uniform(-VARIED_JITTER,
                                                                         VARIED_JITTER)
        style = rng.choice(("exact", "subpixel", "antialiased"))
        if style != "exact":
            return _render_fine(facts, s, frac, fx + jx, fy + jy, style), caption, facts
        d = max(2, round(frac * s))
    else:
        d = max(2, round(SIZE_FRACTION[facts["size"]] * s))  # bounding-box side in pixels
    # Top-left pixel of the box; clamped so large corner shapes stay whole in the frame.
    x0 = min(max(round((fx + jx) * s - d / 2), 0), s - d)
    y0 = min(max(round((fy + jy) * s - d / 2), 0), s - d)
    x1, y1 = x0 + d - 1, y0 + d - 1  # inclusive, as Pillow draws them
    img = Image.new("RGB", (s, s), BACKGROUND_RGB[facts["background"]])
    draw = ImageDraw.Draw(img)  # fill-only drawing in RGB mode: no anti-aliasing
    fill = PALETTE[facts["colour"]]
    if facts["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif facts["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    else:
        for r, w in enumerate(_triangle_rows(d)):
            left = x0 + (d - w) // 2
            draw.line((left, y0 + r, left + w - 1, y0 + r), fill=fill)
    return np.asarray(img, dtype=np.uint8).copy(), caption, facts


def _render_fine(facts: Facts, s: int, frac: float, cx: float, cy: float, style: str
                 ) -> np.ndarray:
    """The shape at sub-pixel coordinates, drawn at `SUPERSAMPLE`x as a coverage mask, then
    box-filtered down: "antialiased" blends the edges, "subpixel" thresholds at half."""
    k = SUPERSAMPLE
    d = frac * s
    cx = min(max(cx * s, d / 2), s - d / 2)  # the whole shape stays in the frame
    cy = min(max(cy * s, d / 2), s - d / 2)
    x0, y0, x1, y1 = ((cx - d / 2) * k, (cy - d / 2) * k, (cx + d / 2) * k, (cy + d / 2) * k)
    mask = Image.new("L", (s * k, s * k), 0)
    draw = ImageDraw.Draw(mask)
    if facts["shape"] == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif facts["shape"] == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    cover = np.asarray(mask.resize((s, s), Image.Resampling.BOX), dtype=np.float64) / 255.0
    if style == "subpixel":
        cover = (cover >= 0.5).astype(np.float64)
    bg = np.array(BACKGROUND_RGB[facts["background"]], dtype=np.float64)
    fg = np.array(PALETTE[facts["colour"]], dtype=np.float64)
    img = bg + cover[..., None] * (fg - bg)
    return np.rint(img).clip(0, 255).astype(np.uint8)


def partial_caption(facts: Facts, rng: random.Random) -> str:
    """A caption naming a random non-empty subset of the facts, in the template's order:
    "a red circle", "a large shape in the top left", "a triangle on a black background"."""
    while True:
        keep = {k for k in FACT_KEYS if rng.random() < 0.5}
        if keep:
            break
    words = ["a"]
    words += [str(facts[k]) for k in ("size", "colour") if k in keep]
    words.append(str(facts["shape"]) if "shape" in keep else "shape")
    if "position" in keep:
        words.append(f"in the {facts['position']}")
    if "background" in keep:
        words.append(f"on a {facts['background']} background")
    return " ".join(words)


def _nearest(rgb: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Index of the nearest colour (squared RGB distance) for each pixel of [..., 3]."""
    diff = rgb[..., None, :].astype(np.int32) - colours.astype(np.int32)
    return (diff * diff).sum(-1).argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (stray pixels dropped)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        size, queue = 0, deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best


_FG = np.array([PALETTE[c] for c in COLOURS])
_BG = np.array([BACKGROUND_RGB[b] for b in BACKGROUNDS])


def analyse(image: np.ndarray) -> Facts:
    """Read the facts back from an image [H, W, 3] uint8 (or a torch tensor [3, H, W]).

    - background: the dominant colour of the border, snapped to the background palette;
    - foreground: pixels nearer a foreground colour than the background, largest connected
      part; its mean colour snapped to the palette;
    - position: the centre of the foreground's bounding box (the grammar's definition; a
      triangle's pixel centroid sits d/6 below it), by region: within 0.1 of the middle on
      an axis is "center" on that axis;
    - shape: a near-full bounding box is a square; else a bottom-heavy mass (the upward
      triangle's top half holds about a quarter of it) is a triangle; else a circle;
    - size: the box's longer side against the midpoint of 0.3 and 0.55 of the image side.
    Values are None when no foreground is found.
    """
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).numpy()
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DatasetError(f"analyse expects an RGB image [H, W, 3], got shape {img.shape}")
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_index = int(np.bincount(_nearest(border, _BG), minlength=len(_BG)).argmax())
    facts: Facts = dict.fromkeys(FACT_KEYS)
    facts["background"] = BACKGROUNDS[bg_index]

    # Each pixel goes to the nearest of {this background, the six foreground colours}.
    candidates = np.concatenate([_BG[bg_index : bg_index + 1], _FG])
    labels = _nearest(img, candidates)  # 0 = background, 1 + k = COLOURS[k]
    if not (labels != 0).any():
        return facts
    mask = _largest_component(labels != 0)
    colour = int(_nearest(img[mask].mean(0), _FG))
    facts["colour"] = COLOURS[colour]
    # The shape is the part in that colour: stray pixels of other colours that touch it
    # (noise in a generated image) would otherwise stretch its bounding box.
    mask = _largest_component(mask & (labels == 1 + colour))

    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    bh, bw = bottom - top + 1, right - left + 1
    cx, cy = (left + right + 1) / 2 / w, (top + bottom + 1) / 2 / h  # box centre, fractions
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else None
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else None
    if col is None and row is None:
        facts["position"] = "center"
    else:  # one axis in the middle band: the nearest corner of the grammar
        facts["position"] = min(
            POSITIONS[:4],
            key=lambda p: (POSITION_CENTRE[p][0] - cx) ** 2 + (POSITION_CENTRE[p][1] - cy) ** 2,
        )

    # All three shapes are convex along rows, so a row's span (first to last pixel) fills
    # holes that noise punches into a generated shape.
    box = mask[top : bottom + 1, left : right + 1]
    has = box.any(1)
    first, last = box.argmax(1), bw - 1 - box[:, ::-1].argmax(1)
    rows = np.where(has, last - first + 1, 0).astype(np.float64)
    area = rows.sum()
    fill = area / (bh * bw)
    half = bh / 2  # mass of the top half, counting a middle row half
    top_mass = rows[: int(half)].sum() + (rows[int(half)] / 2 if bh % 2 else 0.0)
    if fill >= 0.92:
        facts["shape"] = "square"
    elif top_mass / area < 0.4:
        facts["shape"] = "triangle"
    else:
        facts["shape"] = "circle"
    threshold = (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2 * min(h, w)
    facts["size"] = "small" if max(bh, bw) < threshold else "large"
    return facts


class ShapesDataset(Dataset):
    """Shapes images drawn on access: train is indices 0..N-1, val 1,000,000..1,001,999."""

    channels = 3
    num_classes = 0
    class_names = None

    def __init__(self, image_size: int, split: str = "train",
                 shapes_train_size: int = TRAIN_SIZE, synonym_prob: float = 0.0) -> None:
        if not MIN_SIZE <= image_size <= MAX_SIZE:
            raise DatasetError(
                f"shapes image_size must be in {MIN_SIZE}..{MAX_SIZE}, got {image_size}")
        if shapes_train_size < 1 or shapes_train_size > VAL_START:
            raise DatasetError(
                f"shapes_train_size must be in 1..{VAL_START}, got {shapes_train_size}")
        if not 0.0 <= synonym_prob <= 1.0:
            raise DatasetError(f"shapes synonym_prob must be in [0, 1], got {synonym_prob}")
        self.image_size = image_size
        self.split = check_split(split)
        # Training captions only: validation stays in the grammar, so bits/dim and the
        # evaluation's prompts mean the same with and without rewording.
        self.synonym_prob = synonym_prob if split == "train" else 0.0
        # Partial captions and varied geometry are for training only, likewise.
        self.partial_prob = PARTIAL_PROB if split == "train" else 0.0
        self.varied = split == "train"
        self.start = 0 if split == "train" else VAL_START
        self.size = shapes_train_size if split == "train" else VAL_SIZE

    def __len__(self) -> int:
        return self.size

    def index_of(self, i: int) -> int:
        """The grammar index (the seed) of item `i` of this split."""
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a split of {self.size}")
        return self.start + i

    def _caption(self, index: int, caption: str, facts: Facts) -> str:
        """`caption`, or with probability `synonym_prob` (its own draw from the index) the
        facts reworded with the training synonym list (`training.paraphrase`), or else with
        probability `partial_prob` (another draw) a caption of some of the facts."""
        if self.synonym_prob and random.Random(f"synonyms:{index}").random() < self.synonym_prob:
            from training.paraphrase import reword_for_training

            return reword_for_training(facts, random.Random(f"reword:{index}"))
        if self.partial_prob and random.Random(f"partial:{index}").random() < self.partial_prob:
            return partial_caption(facts, random.Random(f"subset:{index}"))
        return caption

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        index = self.index_of(i)
        img, caption, facts = render(index, self.image_size, varied=self.varied)
        caption = self._caption(index, caption, facts)
        return torch.from_numpy(img.transpose(2, 0, 1).copy()), caption, -1

    def captions(self) -> list[str]:
        """Every caption of the split, without drawing the images."""
        out = []
        for i in range(self.size):
            facts, _, _, form = _draw_facts(random.Random(self.start + i))
            out.append(self._caption(self.start + i, TEMPLATES[form].format(**facts), facts))
        return out
