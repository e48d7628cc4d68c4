"""Sampling images from trained models: the LlamaGen baseline, IAR and CTF's two stages.

Split by concept, so each part can be read on its own:

- `generate`: logits -> tokens (guidance, top-k / top-p, the draw), the KV-cache decode loop (`generate`),
  CTF's one-pass stage 2 (`refine`) and its refiner-free
  alternative (`draw_in_cluster`), `SampleSettings` / `describe_settings` and `SampledTokens`;
- `pipeline`: `Pipeline` (tokenizer + model(s) + clusters, loaded from files with every fingerprint
  checked) and `write_ctf_pipeline`, the JSON that ties CTF's two runs together;
- `folder`: what `clusterar sample` writes: `make_labels`, and `sample_to_folder`'s resumable folder of
  grid.png, PNGs, an ADM-format .npz and sample.json.

The names below are the package's public API (`from clusterar.sample import Pipeline, generate` is the usual use).
"""

from __future__ import annotations

from .folder import make_labels, sample_to_folder, save_sample_grid
from .generate import (
    STAGE2_MODES,
    STAGE2_SETTINGS,
    SampledTokens,
    SampleSettings,
    auto_compile,
    compiled,
    describe_settings,
    draw,
    draw_in_cluster,
    ensure_cache,
    filter_top_k,
    filter_top_p,
    generate,
    guide,
    refine,
    sample_logits,
    token_step,
)
from .pipeline import LLAMAGEN_SUFFIXES, PIPELINE_KIND, PIPELINE_VERSION, Pipeline, write_ctf_pipeline

__all__ = [
    "STAGE2_MODES",
    "STAGE2_SETTINGS",
    "LLAMAGEN_SUFFIXES",
    "PIPELINE_KIND",
    "PIPELINE_VERSION",
    "Pipeline",
    "SampleSettings",
    "SampledTokens",
    "auto_compile",
    "compiled",
    "token_step",
    "describe_settings",
    "draw",
    "draw_in_cluster",
    "ensure_cache",
    "filter_top_k",
    "filter_top_p",
    "generate",
    "guide",
    "make_labels",
    "refine",
    "sample_logits",
    "sample_to_folder",
    "save_sample_grid",
    "write_ctf_pipeline",
]
