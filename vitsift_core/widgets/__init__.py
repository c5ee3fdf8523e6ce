"""Interactive explorers (ipywidgets): attention, stages and masking, in JupyterLab or Voila.

- :mod:`.core`: explorer state -> figure data, plain numpy on cached attention (no widgets);
- :mod:`.render`: figure data -> PNG (numpy/PIL overlays, small matplotlib plots);
- :mod:`.ui`: the ipywidgets that wire them (``AttentionExplorer``, ``StageExplorer``,
  ``MaskingExplorer``);
- :mod:`.serve`: ``make explore``, the explorers notebook served by Voila on localhost.

The model runs once per image; every slider or click after that redraws from the cached maps
(``benchmarks/explorer_latency.py`` measures how fast).
"""
from __future__ import annotations

from vitsift_core.widgets.core import (AttentionState, AttentionView, ImageData, ImageLibrary, MaskingState, StageView, analyse,
                   attention_view, from_example, masking_view, patch_at, stage_view)

__all__ = ["AttentionState", "AttentionView", "ImageData", "ImageLibrary", "MaskingState", "StageView", "analyse",
           "attention_view", "from_example", "masking_view", "patch_at", "stage_view", "AttentionExplorer", "StageExplorer",
           "MaskingExplorer", "probe_classifier", "library"]


def __getattr__(name):
    # the widget classes import ipywidgets / ipyevents only when asked for
    if name in ("AttentionExplorer", "StageExplorer", "library"):
        from vitsift_core.widgets import ui
        return getattr(ui, name)
    if name in ("MaskingExplorer", "probe_classifier"):
        from vitsift_core.widgets import masking_ui
        return getattr(masking_ui, name)
    raise AttributeError(name)
