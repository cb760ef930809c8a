"""llavadi — offline, staged knowledge distillation for LLaVA-style multimodal LLMs.

The repository root is the ``llavadi`` package: ``llavadi.cli``, ``llavadi.pipeline``
(stage-agnostic runtime), ``llavadi.stages`` (one module per stage) and ``llavadi.schemas``
(on-disk contracts). See README.md and the design reference.
"""

__version__ = "0.1.0"
