"""The private (underscored or module-internal) parts of diffusers the pipeline uses, in one place, with the
version they were checked against (pyproject pins diffusers==0.42.*). `pipeline/` never imports `serve/`,
so it has this module of its own beside `serve/_compat.py`.

- `prompt_clean`: the text clean-up WanPipeline applies to every prompt before tokenising
  (`diffusers.pipelines.wan.pipeline_wan`, not exported); the text encoder must match it exactly.
- `unpatchify`: the Wan VAE's output unpatching (`diffusers.models.autoencoders.autoencoder_kl_wan`),
  used by the frame-by-frame decoder. Checked with diffusers 0.42.1.
"""

from __future__ import annotations

from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

CHECKED_VERSIONS: dict[str, str] = {"diffusers": "0.42.1"}

__all__ = ["CHECKED_VERSIONS", "prompt_clean", "unpatchify"]
