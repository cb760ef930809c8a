"""Stage 0 of the demo teacher: pre-train its vision tower, as LLaVA starts from a pre-trained CLIP.

A randomly initialised tiny LLaVA trained end to end on the demo's visual QA spends most of its
budget finding the image at all (issue #14's calibration: loss on the answer prior for 500–1000+
steps, colours or shapes never read within 2000). Here the vision tower alone learns, on rendered
scenes, to name the colour and the shape in each grid cell (a linear head per attribute on each
patch token, the tokens LLaVA's ``default`` feature selection passes to the projector); the heads
become the first rows of the projector's first layer (the colour and shape evidence then reaches the
language model as large, separate features: with a random projector a teacher read colours from the
pre-trained tower within 500 steps but still guessed shapes after 1000), and the language model
and projector are fine-tuned on the conversations with the tower frozen.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _batch(rng: np.random.RandomState, processor, n: int, grid: int = 2):
    import torch

    from . import synthetic_vqa as sv

    colours, shapes = list(sv.COLOURS), list(sv.SHAPES)
    ims, col, shp = [], np.zeros((n, grid * grid), np.int64), np.zeros((n, grid * grid), np.int64)
    for i in range(n):  # class 0 = empty cell
        scene = sv.make_scene(rng, grid)
        ims.append(sv.render(scene, rng, grid=grid))
        for o in scene:
            col[i, o.cell], shp[i, o.cell] = 1 + colours.index(o.colour), 1 + shapes.index(o.shape)
    pv = processor.image_processor(ims, return_tensors="pt")["pixel_values"]
    return pv, torch.from_numpy(col), torch.from_numpy(shp)


def pretrain_vision(model, processor, *, steps: int, batch: int = 128, lr: float = 1e-3, seed: int = 0,
                    progress: bool = True) -> dict:
    """Train ``model``'s vision tower in place (AdamW, cosine from ``lr``) to classify each patch
    token's cell: colour (8 + empty) and shape (3 + empty), cross-entropy summed. Returns
    ``{"steps", "cell_accuracy"}``: both attributes right, per non-empty cell, on a fresh batch
    of 512 scenes. Requires a 2×2 grid with one patch per cell (``image_size / patch_size == 2``)."""
    import torch
    from tqdm import tqdm

    from . import synthetic_vqa as sv

    vcfg = model.config.vision_config
    if vcfg.image_size // vcfg.patch_size != 2:
        raise ValueError("vision pre-training expects one patch per cell of the 2×2 grid")
    torch.manual_seed(seed)
    rng = np.random.RandomState([seed, 7])
    tower = model.model.vision_tower
    head = torch.nn.Linear(vcfg.hidden_size, len(sv.COLOURS) + 1 + len(sv.SHAPES) + 1)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    nc = len(sv.COLOURS) + 1

    def logits(pv):
        feats = tower(pv, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        out = head(feats)  # [B, 4, nc + ns]
        return out[..., :nc], out[..., nc:]

    tower.train()
    for _ in tqdm(range(steps), desc="vision pre-training", disable=not progress):
        pv, col, shp = _batch(rng, processor, batch)
        lc, ls = logits(pv)
        loss = torch.nn.functional.cross_entropy(lc.flatten(0, 1), col.flatten()) + \
            torch.nn.functional.cross_entropy(ls.flatten(0, 1), shp.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    tower.eval()
    with torch.no_grad():  # the projector's first layer starts as the heads: class evidence as features
        proj = model.model.multi_modal_projector.linear_1
        proj.weight[: head.out_features] = head.weight
        proj.bias[: head.out_features] = head.bias
        pv, col, shp = _batch(np.random.RandomState([seed, 8]), processor, 512)
        lc, ls = logits(pv)
        full = col > 0
        right = (lc.argmax(-1) == col) & (ls.argmax(-1) == shp)
        acc = float(right[full].float().mean())
    return {"steps": steps, "cell_accuracy": round(acc, 4)}


def pretrain_vision_dir(src: Path, out: Path, steps: int, *, seed: int) -> dict:
    """``pretrain_vision`` on the model saved in ``src``; the result is saved (same layout, plus
    ``vision_pretrain.json`` with the returned facts and ``seconds``) to ``out``, atomically."""
    import json
    import shutil
    import time

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ...models.llava import LLAVA
    from ...pipeline import atomic
    from .steps import scratch_dir

    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(src)
    t0 = time.time()
    facts = pretrain_vision(model, processor, steps=steps, seed=seed)
    facts["seconds"] = round(time.time() - t0, 1)
    tmp = scratch_dir(out)
    LLAVA.save(model, processor, tmp)
    for extra in Path(src).glob("llavadi_*.json"):
        shutil.copy2(extra, tmp / extra.name)
    (tmp / "vision_pretrain.json").write_text(json.dumps(facts) + "\n")
    atomic.replace_dir(tmp, out)
    return facts
