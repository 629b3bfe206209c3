"""Names of the model's levels and of its plain-string options, each spelled once.

Plain Python (no jax), so the config layer can import them cheaply; `vqvae2_jax.registry`
re-exports them beside the stage and option names of the rest of the package.
"""
from __future__ import annotations

# Level names, top first, by number of levels; 'level<i>' beyond 3.
LEVEL_NAMES = {1: ("bottom",), 2: ("top", "bottom"), 3: ("top", "mid", "bottom")}
# How each level's quantized map is brought up 2x (models/layers.Upsample2x).
UPSAMPLE_TRANSPOSE, UPSAMPLE_SUBPIXEL, UPSAMPLE_RESIZE = "transpose", "subpixel", "resize"
UPSAMPLE_MODES = (UPSAMPLE_TRANSPOSE, UPSAMPLE_SUBPIXEL, UPSAMPLE_RESIZE)
# Rematerialisation of residual / gated blocks (models/remat.py): off, or per block.
REMAT_NONE, REMAT_BLOCK = "none", "block"
REMAT_MODES = (REMAT_NONE, REMAT_BLOCK)
# 'paper': this package's layers; 'public': the public PyTorch VQ-VAE-2 code's layers
# (models/public_vqvae.py, models/public_pixelsnail.py).
PAPER, PUBLIC = "paper", "public"
ARCHITECTURES = (PAPER, PUBLIC)


def level_names(num_levels: int) -> tuple[str, ...]:
  """Names of the levels, top first ('top', ['mid',] 'bottom'; 'level{i}' beyond 3)."""
  return LEVEL_NAMES.get(num_levels, tuple(f"level{i}" for i in range(num_levels)))
