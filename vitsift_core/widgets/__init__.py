"""Interactive explorers (ipywidgets) of attention, stages and masking, in JupyterLab or Voila.

:mod:`.core`: state -> figure data from cached attention; :mod:`.render`: figure data -> PNG;
:mod:`.ui`: the widgets; :mod:`.serve`: ``make explore``.
"""
from __future__ import annotations

from vitsift_core.widgets.core import (AttentionState, AttentionView, ImageData, ImageLibrary, MaskingState,
                                       StageView, analyse, attention_view, from_example, masking_view, patch_at,
                                       stage_view)

UI = ("AttentionExplorer", "StageExplorer", "MaskingExplorer", "probe_classifier")


def __getattr__(name):
    if name in UI:           # ipywidgets / ipyevents are imported only when a widget is asked for
        from vitsift_core.widgets import ui
        return getattr(ui, name)
    raise AttributeError(name)
