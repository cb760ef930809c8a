"""The demo's pre-trained teacher: a committed, deterministic builder (issue #14).

A real user starts from a published teacher; the demo does the same with ``assets/demo_teacher/``,
which this module made (``llavadi demo --rebuild-teacher`` runs it again). Steps, all through
llavadi's own stages in ``<work>/``:

1. the demo vocabulary (``vocab.py``, LLaVA's own system text) and a seeded tiny LLaVA
   (``tiny_models.DEMO_TEACHER``) saved as llava-1.5-hf lays out its files;
2. synthetic visual-QA conversations from a data seed the demo's own splits never use
   (``TEACHER_DATA_SEED``): ``teacher_train`` and a ``teacher_heldout`` split;
3. supervised fine-tuning (``steps.sft``: ingest → cache-teacher targets → train-student, KD off);
4. greedy ``llavadi eval`` on ``teacher_heldout``;
5. the final checkpoint is published atomically to the output dir with ``MODEL_CARD.md`` (how it
   was made, training time, held-out accuracy, each file's sha256).

Deterministic: every random choice is seeded; on one machine with the same thread count the
same command writes the same weights (CPU float kernels may round differently on another CPU).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .steps import copy_model, evaluate_cached, say, scratch_dir, sft
from .vision_pretrain import pretrain_vision_dir

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo_teacher"
TEACHER_DATA_SEED = 1  # the demo's labelled/unlabelled/validation/test splits use seed 0
CARD = "MODEL_CARD.md"


@dataclass(frozen=True)
class BuildSize:
    train: int  # teacher_train conversations
    heldout: int  # teacher_heldout conversations (never trained on)
    steps: int
    batch: int
    lr: float = 1e-3  # 3e-3 collapsed to the answer prior in 4 of 5 calibration runs
    vision_steps: int = 150  # stage 0: vision tower pre-training steps × 128 scenes (vision_pretrain.py)
    caption_frac: float = 0.3  # teacher_train image conversations that are dense captions (synthetic_vqa.caption)


SIZES = {
    "full": BuildSize(train=40000, heldout=400, steps=4000, batch=64),
    "smoke": BuildSize(train=40, heldout=8, steps=2, batch=8, vision_steps=2),
}


def build_teacher(work: Path | str, out: Path | str = ASSET_DIR, *, size: str = "full", executor: str = "ray") -> dict:
    """Build the demo teacher in ``work`` and publish it to ``out``; returns the card's facts
    (``accuracy`` on ``teacher_heldout``, ``train_seconds``, ``sha256`` per file).
    Rerunning with the same ``work`` reuses its finished stages."""
    from ...models.prompts import LLAVA_V1_SYSTEM
    from ...pipeline import atomic
    from . import synthetic_vqa, tiny_models
    from .vocab import build_demo_tokenizer

    sz = SIZES[size]
    work, out = Path(work).resolve(), Path(out).resolve()
    init = work / "models" / "teacher_init"
    if not (init / "config.json").exists():
        say(f"building the teacher's initial weights ({tiny_models.DEMO_TEACHER})")
        tiny_models.build_tiny_llava(init, tiny_models.DEMO_TEACHER, system=LLAVA_V1_SYSTEM,
                                     tokenizer=build_demo_tokenizer(LLAVA_V1_SYSTEM))
    vision = work / "models" / "teacher_vision"
    if not (vision / "config.json").exists():  # stage 0: a pre-trained vision tower, as LLaVA's CLIP
        say(f"stage 0: pre-training the vision tower ({sz.vision_steps} steps)")
        facts_v = pretrain_vision_dir(init, vision, sz.vision_steps, seed=TEACHER_DATA_SEED)
    else:
        facts_v = json.loads((vision / "vision_pretrain.json").read_text())
    data = work / "synthetic"
    for split, n in (("teacher_train", sz.train), ("teacher_heldout", sz.heldout)):
        if not (data / f"{split}.json").exists():
            say(f"generating {n} {split} conversations")
            synthetic_vqa.generate(data, n, seed=TEACHER_DATA_SEED, split=split,
                                   caption_frac=sz.caption_frac if split == "teacher_train" else 0.0)
    base = [f"run.executor={executor}", f"ingest.image_root={json.dumps(str(data))}", "ingest.shard_size=2000",
            "teacher.max_model_len=512", "cache_teacher.batch_size=64"]
    t0 = time.time()
    run = work / "runs" / "teacher_sft"
    ckpt = sft(run, data / "teacher_train.json", base, vision, steps=sz.steps, batch=sz.batch, lr=sz.lr,
               save_every=max(1, sz.steps // 6), keep=7, freeze_vision=True)
    train_s = time.time() - t0
    ev = evaluate_cached(run, ckpt, "teacher_heldout", [
        f"eval.data={json.dumps(str(data / 'teacher_heldout.json'))}", f"eval.image_root={json.dumps(str(data))}",
        "eval.max_new_tokens=6"])
    facts = {"accuracy": ev["answers"]["accuracy"], "questions": ev["answers"]["scored"],
             "train_seconds": round(train_s, 1), "size": asdict(sz), "spec": asdict(tiny_models.DEMO_TEACHER),
             "data_seed": TEACHER_DATA_SEED, "built": time.strftime("%Y-%m-%d"), "vision": facts_v}
    tmp = scratch_dir(out)
    copy_model(ckpt, init, tmp)
    facts["sha256"] = {p.name: atomic.sha256_file(p) for p in sorted(tmp.iterdir())}
    facts["vocab"] = json.loads((tmp / "config.json").read_text())["text_config"]["vocab_size"]
    (tmp / CARD).write_text(model_card(facts))
    atomic.replace_dir(tmp, out)  # the old teacher goes only once the new one is complete
    say(f"teacher published to {out}: {100 * facts['accuracy']:.1f} % on {sz.heldout} held-out conversations")
    return facts


def model_card(f: dict) -> str:
    sz, spec = f["size"], f["spec"]
    files = "\n".join(f"| `{n}` | `{h}` |" for n, h in f["sha256"].items())
    return f"""# llavadi demo teacher

A tiny LLaVA-1.5-shaped model (`LlavaForConditionalGeneration`: CLIP-style vision tower
{spec['vision_layers']}×{spec['vision_hidden']}, 2-layer GELU projector, Llama LM {spec['layers']}×{spec['hidden']},
{spec['image_size']}-px images in {spec['patch_size']}-px patches = {(spec['image_size'] // spec['patch_size']) ** 2} visual tokens)
with the demo's {f['vocab']}-row BPE vocabulary and LLaVA's `conv_vicuna_v1` prompt (its own system text).
`llavadi demo` distils it into a smaller student; it is not useful for anything else.

## How it was made
`llavadi demo --rebuild-teacher` (`stages/demo/teacher_builder.py`), built {f['built']}.
Stage 0, in place of a pre-trained CLIP: the vision tower alone learns to name each cell's colour and
shape ({f['vision']['steps']} steps × 128 rendered scenes, {f['vision']['seconds']:.0f} s; {100 * f['vision']['cell_accuracy']:.1f} % of cells right
after). Then supervised fine-tuning through llavadi's own stages on {sz['train']} synthetic visual-QA conversations
(data seed {f['data_seed']}; the demo's splits use seed 0), {sz['steps']} steps × batch {sz['batch']},
AdamW lr {sz['lr']} cosine, the pre-trained vision tower frozen (as LLaVA keeps CLIP frozen). Training time: {f['train_seconds'] / 60:.1f} min on 2 CPU cores.

## Held-out accuracy
**{100 * f['accuracy']:.1f} %** (greedy answers, VQA-normalised match) on {sz['heldout']} `teacher_heldout`
conversations ({f['questions']} questions) it never trained on.

## Files (sha256)
| file | sha256 |
|---|---|
{files}
"""


def main(argv: list[str] | None = None) -> None:
    """``python -m llavadi.stages.demo.teacher_builder [WORK] [OUT]``: rebuild the shipped teacher
    (``make demo-teacher``); WORK defaults to ``demo_teacher_build/``, OUT to the asset dir."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    work = Path(args[0]) if args else Path("demo_teacher_build")
    out = Path(args[1]) if len(args) > 1 else ASSET_DIR
    build_teacher(work, out)


if __name__ == "__main__":
    main()
