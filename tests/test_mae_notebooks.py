"""Notebooks 01 and 07: every parameter line reaches papermill, and 01 finds 07's recipe."""
from __future__ import annotations

import json

import pytest

from vitsift_core import reproduce as R
from vitsift_core.experiments.pretrain import config_from_params
from vitsift_core.experiments.recovery import notebook_parameters

MINE = ("01_image_recovery", "07_guided_mae")


@pytest.mark.parametrize("nb", MINE)
def test_every_parameter_line_is_seen_by_papermill(nb):
    """papermill silently drops a parameter whose comment contains '=' or '>=' (it then keeps
    the notebook default and the profile check rejects the key): each line must parse."""
    path = R.NOTEBOOKS / f"{nb}.ipynb"
    cell = next(c for c in json.loads(path.read_text())["cells"]
                if "parameters" in c.get("metadata", {}).get("tags", []))
    names = [line.split(":")[0].strip() for line in "".join(cell["source"]).splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    declared = R.declared_parameters(path)
    assert [n for n in names if n not in declared] == []


def test_recovery_uses_notebook_07_recipe_of_the_profile():
    p = notebook_parameters("smoke", "07_guided_mae")
    cfg = config_from_params(p, mask="random", seed=0)
    assert (cfg.encoder, cfg.img_size, cfg.epochs, cfg.batch_size) == ("test_vit", 32, 2, 8)
    emb = config_from_params(notebook_parameters("embedded", "07_guided_mae"))
    assert emb.img_size == 64 and emb.train_images == "imagenette:train"
    # no such profile file: the notebook's own defaults
    assert notebook_parameters("no-such-profile", "07_guided_mae")["img_size"] == 64
