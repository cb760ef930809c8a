"""Make PyPI's (CUDA) torchvision importable beside a CPU torch.

torchvision/_meta_registrations.py registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally; without the native extension those ops do not exist and
the import fails ("operator torchvision::nms does not exist"). vLLM's LLaVA code needs
``torchvision.transforms.v2``, so torchvision cannot simply be removed. We guard the two
registrations with ``torchvision.extension._has_ops()`` (see shared/cpu-environment.md).
Idempotent; rerun after anything reinstalls torchvision.
"""
import importlib.util
import pathlib
import re
import sys

spec = importlib.util.find_spec("torchvision")
if spec is None or spec.origin is None:
    sys.exit("torchvision is not installed; nothing to fix")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
MARK = "# llavadi: guarded"
if MARK in src:
    print(f"[setup] torchvision fix already applied ({path})")
    sys.exit(0)
pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n', re.M)
if not pattern.search(src):
    print(f"[setup] torchvision fix: pattern not found in {path}; leaving it as is")
    sys.exit(0)


def guard(m: re.Match) -> str:
    op = m.group(1)
    return (f"@(torch.library.register_fake(\"torchvision::{op}\") "
            f"if __import__('torchvision.extension').extension._has_ops() else (lambda f: f))  {MARK}\n")


path.write_text(pattern.sub(guard, src))
print(f"[setup] torchvision fix applied to {path}")
