"""Deterministic synthetic visual-QA data in LLaVA format (images + JSON), sized by arguments.

Scene: a ``grid × grid`` board (default 2×2, one visual token per cell with 32-px images and
16-px patches — few visual tokens make the task learnable on a CPU, see
shared/demo-calibration.md) holding 1–4 shapes (circle, square, triangle) in 8 colours on a
black background, with colour jitter and pixel noise. Questions (answers are 1–2 words): colour of a shape, count of
all shapes, count of one shape, is there a <shape>, what is at a position, where is an
object. Some conversations are multi-turn (2–3 questions about one image) and some rows are
text-only (small arithmetic), as in LLaVA-665k's mix. The demo teacher's builder adds dense
captions (``caption_frac``), as LLaVA's stage 1 trains on captions.

Same arguments → same files, byte for byte.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "purple": (140, 50, 180), "orange": (240, 140, 30), "white": (240, 240, 240), "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS_2x2 = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# black: every shape is brighter than the background in some channel, so circle / square / triangle
# differ linearly in a patch's pixels whatever the colour (a linear probe on 16-px cells: 100 % vs 53 %
# on mid-grey, where a tiny teacher told colours and positions apart within 500 steps but still
# guessed shapes after 1500; issue #14's calibration)
BACKGROUND = (0, 0, 0)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cell: int


def _positions(grid: int) -> list[str]:
    if grid == 2:
        return list(POSITIONS_2x2)
    return [f"row {r + 1} column {c + 1}" for r in range(grid) for c in range(grid)]


def make_scene(rng: np.random.RandomState, grid: int = 2) -> list[Obj]:
    n_cells = grid * grid
    n = int(rng.randint(1, min(4, n_cells) + 1))
    cells = sorted(rng.choice(n_cells, size=n, replace=False).tolist())
    return [Obj(SHAPES[rng.randint(len(SHAPES))], list(COLOURS)[rng.randint(len(COLOURS))], c) for c in cells]


def render(scene: list[Obj], rng: np.random.RandomState, image_size: int = 32, grid: int = 2):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    d = ImageDraw.Draw(im)
    cell = image_size // grid
    for o in scene:
        r, c = divmod(o.cell, grid)
        x0, y0 = c * cell, r * cell
        m = max(1, cell // 6)
        box = (x0 + m, y0 + m, x0 + cell - m - 1, y0 + cell - m - 1)
        jitter = rng.randint(-25, 26, size=3)
        col = tuple(int(v) for v in np.clip(np.array(COLOURS[o.colour]) + jitter, 0, 255))
        if o.shape == "circle":
            d.ellipse(box, fill=col)
        elif o.shape == "square":
            d.rectangle(box, fill=col)
        else:
            d.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=col)
    arr = np.asarray(im).astype(np.int16) + rng.randint(-12, 13, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def ask(scene: list[Obj], rng: np.random.RandomState, grid: int = 2) -> tuple[str, str]:
    """One (question, answer) about the scene."""
    pos = _positions(grid)
    kind = rng.randint(6)
    o = scene[rng.randint(len(scene))]
    if kind == 0:
        same = [x for x in scene if x.shape == o.shape]
        if len(same) == 1:
            return f"What colour is the {o.shape}?", o.colour
        return f"What colour is the {o.shape} at the {pos[o.cell]}?", o.colour
    if kind == 1:
        return "How many shapes are there?", NUMBER_WORDS[len(scene)]
    if kind == 2:
        s = SHAPES[rng.randint(len(SHAPES))]
        return f"How many {s}s are there?", NUMBER_WORDS[sum(x.shape == s for x in scene)]
    if kind == 3:
        # one attribute, yes/no about evenly: "Is there a <colour> <shape>?" (a colour and a shape
        # bound to one cell) stayed at "yes" for every question in a 3000-step demo teacher (50 %)
        # while counting and naming what is at a position reached 97–100 % (issue #14's calibration)
        present = sorted({x.shape for x in scene})
        absent = [s for s in SHAPES if s not in present]
        if absent and rng.rand() < 0.5:
            return f"Is there a {absent[rng.randint(len(absent))]}?", "no"
        return f"Is there a {present[rng.randint(len(present))]}?", "yes"
    if kind == 4:
        return f"What is at the {pos[o.cell]}?", f"{o.colour} {o.shape}"
    return f"Where is the {o.colour} {o.shape}?", pos[o.cell]


def caption(scene: list[Obj], grid: int = 2) -> tuple[str, str]:
    """A dense description of every object, in cell order (``caption_frac`` conversations): the
    miniature of LLaVA's stage-1 caption data, a teacher-building aid — every answer word is about
    the image, so the vision tower learns from all cells at once."""
    pos = _positions(grid)
    return "Describe the image.", ", ".join(f"{pos[o.cell]} {o.colour} {o.shape}" for o in sorted(scene, key=lambda o: o.cell))


def text_only(rng: np.random.RandomState) -> tuple[str, str]:
    a, b = int(rng.randint(0, 5)), int(rng.randint(0, 5))
    if a + b <= 4:
        return f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a + b]
    return f"Which is larger, {NUMBER_WORDS[a]} or {NUMBER_WORDS[b]}?", NUMBER_WORDS[max(a, b)]


def corpus_lines(grid: int = 2) -> list[str]:
    """Every question and answer text ``ask``/``text_only`` can produce (the demo vocabulary's corpus)."""
    pos = _positions(grid)
    out = ["<image>\n", "How many shapes are there?", "Describe the image."]
    for s in SHAPES:
        out += [f"What colour is the {s}?", f"How many {s}s are there?", f"Is there a {s}?"]
        out += [f"What colour is the {s} at the {p}?" for p in pos]
        for c in COLOURS:
            out += [f"Where is the {c} {s}?", f"{c} {s}"]
            out += [f"{p} {c} {s}, " for p in pos]
    out += [f"What is at the {p}?" for p in pos] + list(pos) + ["yes", "no"]
    for a in range(5):
        for b in range(5):
            out += [f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", f"Which is larger, {NUMBER_WORDS[a]} or {NUMBER_WORDS[b]}?"]
    return out


def generate(out_dir: Path | str, n: int, *, seed: int = 0, split: str = "train", image_size: int = 32,
             grid: int = 2, multi_turn_frac: float = 0.25, text_only_frac: float = 0.1,
             with_answers: bool = True, caption_frac: float = 0.0) -> Path:
    """Write ``out_dir/images/<split>/NNNNNN.png`` and ``out_dir/<split>.json`` (a LLaVA list).

    Image paths in the JSON are relative to ``out_dir`` (pass it as ``--image-root``). With
    ``with_answers=False`` gpt turns hold a placeholder (for data the teacher will answer).
    ``caption_frac``: share of image conversations that are one "Describe the image." turn
    (``caption``); 0 (default) draws no extra random numbers, so other splits are unchanged.
    Returns the JSON path.
    """
    out_dir = Path(out_dir)
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState([seed, sum(map(ord, split))])
    records = []
    for i in range(n):
        rid = f"{split}-{i:06d}"
        if rng.rand() < text_only_frac:
            q, a = text_only(rng)
            records.append({"id": rid, "conversations": [{"from": "human", "value": q},
                                                         {"from": "gpt", "value": a if with_answers else "?"}]})
            continue
        scene = make_scene(rng, grid)
        rel = f"images/{split}/{i:06d}.png"
        render(scene, rng, image_size, grid).save(out_dir / rel, optimize=False)
        if caption_frac and rng.rand() < caption_frac:
            q, a = caption(scene, grid)
            records.append({"id": rid, "image": rel, "conversations": [
                {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a if with_answers else "?"}]})
            continue
        turns = 1 + (int(rng.randint(1, 3)) if rng.rand() < multi_turn_frac else 0)
        conv = []
        for t in range(turns):
            q, a = ask(scene, rng, grid)
            conv.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
            conv.append({"from": "gpt", "value": a if with_answers else "?"})
        records.append({"id": rid, "image": rel, "conversations": conv})
    path = out_dir / f"{split}.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
