"""Interactive explorers (ipywidgets) of attention, stages and masking, in JupyterLab or Voila.

:mod:`.core` / :mod:`.masking_core`: state -> figure data from cached attention (no widgets);
:mod:`.render`: figure data -> PNG; :mod:`.ui` / :mod:`.masking_ui`: the widgets; :mod:`.serve`:
``make explore``. The model runs once per image; every slider or click redraws from the cache.
"""
from __future__ import annotations

from vitsift_core.widgets.core import (AttentionState, AttentionView, ImageData, ImageLibrary, StageView, analyse,
                                      attention_view, from_example, patch_at, stage_view)
from vitsift_core.widgets.masking_core import MaskingState, masking_view

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
