"""HF checkpoint helpers shared by the model builders and the trainer."""
from __future__ import annotations

import os
from pathlib import Path


def rename_for_vllm(model_dir: Path | str) -> None:
    """transformers 5 writes a LLaVA vision tower as ``vision_tower.embeddings.*``; vLLM wants
    ``vision_tower.vision_model.*``. Renaming keeps the file loadable by both libraries
    (shared/cpu-environment.md). Also makes the file world-readable (save_pretrained: 0600)."""
    from safetensors.torch import load_file, save_file

    path = Path(model_dir) / "model.safetensors"
    sd = load_file(path)
    out = {}
    for k, v in sd.items():
        i = k.find("vision_tower.")
        if i >= 0 and ".vision_model." not in k:
            j = i + len("vision_tower.")
            k = k[:j] + "vision_model." + k[j:]
        out[k] = v.contiguous()
    save_file(out, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)
