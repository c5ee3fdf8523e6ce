"""The model zoo (issue 19 item 1): the list matches the issue, every zoo architecture goes through the
analysis suite, claims, side-by-side tables and notebook 09 with random-init weights (explicitly asked
for), offline; a model whose weights are missing is reported and skipped."""
import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from vitsift_core.experiments import zoo
from vitsift_core.experiments.analysis import AnalysisParams
from vitsift_core.model.registry import display_name, load_model
from vitsift_core.report import zoo as rz
from vitsift_core.report.claims import Claim

ISSUE_ZOO = {   # issue 19, "Deliver" 1: arch -> objective
    "vit_base_patch16_224.augreg_in21k": "supervised", "deit_base_patch16_224.fb_in1k": "supervised",
    "vit_base_patch16_224.mae": "MAE", "vit_base_patch16_224.dino": "DINO",
    "vit_small_patch14_reg4_dinov2.lvd142m": "DINOv2", "vit_base_patch16_clip_224.openai": "CLIP",
    "vit_large_patch16_224.augreg_in21k": "supervised",
}
DRY = dict(images="samples", limit=2, batch_size=2, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No hub, an empty HF cache, results under tmp (huggingface_hub reads these at import: patch both)."""
    import huggingface_hub.constants as hfc
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("zoo")
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(root / "hf")),
                 ("VITSIFT_RESULTS", str(root / "results")), ("VITSIFT_REPORTS", str(root / "reports"))):
        mp.setenv(k, v)
    mp.setattr(hfc, "HF_HUB_OFFLINE", True)
    mp.setattr(hfc, "HF_HUB_CACHE", str(root / "hf"))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def dry(offline):
    """Every zoo architecture with random-init weights on 2 bundled photos, through the suite and claims."""
    runs = zoo.run_models(AnalysisParams(**DRY), [zoo.ZOO_TOKEN], dry_run_random_init=True, progress=False)
    return runs, rz.collect(runs, n_boot=20)


def test_zoo_list_matches_the_issue():
    assert {m.spec: m.objective for m in zoo.ZOO} == ISSUE_ZOO
    assert [m.spec for m in zoo.ZOO] == list(ISSUE_ZOO)          # the issue's order
    assert set(zoo.OBJECTIVES) == set(ISSUE_ZOO.values())
    for spec in ISSUE_ZOO:           # timm knows every name and tag (no download)
        assert spec in timm.list_pretrained(spec.split(".")[0] + ".*"), spec


def test_entries_bring_their_objective_and_size():
    assert zoo.entry("vit_small_patch14_reg4_dinov2.lvd142m").img_size == 224   # not timm's 518
    r = zoo.entry("random-init:vit_base_patch16_224.mae")
    assert (r.objective, r.spec) == ("MAE", "random-init:vit_base_patch16_224.mae")
    assert "(random-init weights)" in r.label and "[MAE]" in r.label
    assert zoo.entry("test_vit@/x.safetensors").objective == "unknown"
    d = zoo.entry({"spec": "test_vit@/x.safetensors", "objective": "MAE-guided", "img_size": 48})
    assert (d.objective, d.img_size) == ("MAE-guided", 48)
    assert zoo.entry({"spec": "random-init:embedded", "name": "e"}).label == "e (random-init weights) [DINOv2]"
    assert [m.spec for m in zoo.expand(["embedded", "zoo"])] == ["embedded", *ISSUE_ZOO]
    with pytest.raises(ValueError, match="more than once"):
        zoo.expand(["zoo", "vit_base_patch16_224.mae"])
    with pytest.raises(ValueError, match="only the keys"):
        zoo.entry({"spec": "embedded", "objectiv": "x"})
    with pytest.raises(ValueError, match="non-empty list"):
        zoo.expand("embedded")


def test_trained_token_reads_notebook_10s_encoders_of_the_profile(monkeypatch):
    asked = []
    specs = {"supervised": "a@/r/sup.safetensors", "mae-random": "a@/r/mr.safetensors",
             "mae-guided": "a@/r/mg.safetensors"}
    monkeypatch.setattr(zoo.emergence, "profile_specs", lambda profile, progress=True: asked.append(profile) or specs)
    got = zoo.expand(["embedded", zoo.TRAINED_TOKEN], profile="smoke")
    assert asked == ["smoke"]
    assert [m.spec for m in got] == ["embedded", *specs.values()]
    assert [m.objective for m in got] == ["DINOv2", "supervised", "MAE", "MAE"]
    assert got[2].label == "mae-random, trained here [MAE]"
    with pytest.raises(ValueError, match="needs the profile"):
        zoo.expand([zoo.TRAINED_TOKEN])


def test_random_init_spec_is_labelled_and_seeded():
    a = load_model("random-init:test_vit", seed=3)
    b = load_model("test_vit", control="random-init", seed=3)
    assert a.spec == "random-init:test_vit" and a.source == "random-init(seed=3)"
    assert all(np.array_equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert display_name("random-init:embedded").endswith("(random-init weights)")
    with pytest.raises(ValueError, match="non-empty"):
        load_model("random-init:")


def test_relative_depth_by_hand():
    assert rz.relative_depth([1, 12, 24], 24).tolist() == [0.0, 11 / 23, 1.0]
    assert rz.relative_depth([1, 2, 3], 3).tolist() == [0.0, 0.5, 1.0]
    assert rz.relative_depth([1], 1).tolist() == [0.0]
    with pytest.raises(ValueError, match="1..12"):
        rz.relative_depth([13], 12)


def _claims(values):
    return pd.DataFrame([Claim("4.1", c, "m", v, v - 0.1, v + 0.1, v - 0.1 > 0, 5).row() for c, v in values])


def test_wide_claims_one_column_per_model_by_hand():
    status = pd.DataFrame([
        {"model": "A", "objective": "MAE", "status": "ok", "n_images": 5, "n_layers": 12},
        {"model": "B", "objective": "CLIP", "status": "weights unavailable: not here", "n_images": 0, "n_layers": 0},
        {"model": "C", "objective": "DINO", "status": "ok", "n_images": 5, "n_layers": 6}])
    per = {"A": (_claims([("x", 0.5), ("y", 0.05)]), {}), "C": (_claims([("y", 0.2), ("z", -1.0)]), {})}
    w = rz.wide_claims(rz.ZooTables(pd.DataFrame(), per, status, ["A", "B", "C"]))
    assert list(w.columns) == ["section", "claim", "A", "B", "C"]
    assert w.claim.tolist() == ["status", "x", "y", "z"]
    assert w.iloc[0][["A", "B", "C"]].tolist() == ["ok, 5 images", "weights unavailable: not here", "ok, 5 images"]
    assert w.set_index("claim").loc["x", "A"] == "0.5000 [0.4000, 0.6000] holds"
    assert w.set_index("claim").loc["y", "A"] == "0.0500 [-0.0500, 0.1500] fails"
    assert w.set_index("claim").loc["x", "C"] == "-" and set(w.B[1:]) == {"-"}


def test_every_zoo_architecture_runs_with_random_init_weights(dry):
    runs, tables = dry
    assert [r.model.spec for r in runs] == [f"random-init:{s}" for s in ISSUE_ZOO]
    want = {   # patch size, grid, prefix tokens (CLS + registers), blocks
        "vit_small_patch14_reg4_dinov2.lvd142m": (14, [16, 16], 5, 12),
        "vit_large_patch16_224.augreg_in21k": (16, [14, 14], 1, 24),
        "vit_base_patch16_clip_224.openai": (16, [14, 14], 1, 12),
    }
    for r in runs:
        assert r.available and r.skipped_controls == {"random-init": "the model itself has random-init weights"}
        assert ("random-init", False) not in r.runs and ("donor-keypoints", False) in r.runs
        info = json.loads(r.runs[("none", False)].params_json.read_text())["model"]
        assert info["source"] == "random-init(seed=0)"
        arch = r.model.spec.split(":", 1)[1]
        if arch in want:
            assert (info["patch_size"], info["grid"], info["num_prefix_tokens"]) == want[arch][:3]
            assert tables.status.set_index("spec").loc[r.model.spec, "n_layers"] == want[arch][3]
    clip = load_model("random-init:vit_base_patch16_clip_224.openai").model
    assert isinstance(clip.norm_pre, torch.nn.LayerNorm)           # CLIP's pre-norm is there
    assert set(tables.per_model) == {r.model.label for r in runs}
    # the curves sit on relative depth 0..1 for 12 and 24 layers alike
    for model, g in tables.curves.groupby("model"):
        assert g.depth.min() == 0 and g.depth.max() == 1 and g.depth.is_monotonic_increasing
        assert g["semantic_gap"].notna().all(), model
    st = rz.stage_table(tables).set_index("model")
    vitl = st.loc[[m for m in st.index if "vit_large" in m][0]]
    assert vitl.n_layers == 24 and vitl.relative_depth.startswith("0.00-") and vitl.relative_depth.endswith("-1.00")
    assert "layers 1-" in vitl.stages
    wide = rz.wide_claims(tables)
    assert wide.shape[1] == 2 + 7 and all("(random-init weights)" in c for c in wide.columns[2:])
    assert "The KK-NK gap is semantic" in " ".join(wide.claim)


def test_missing_weights_are_reported_and_skipped(dry, offline):
    base = AnalysisParams(**DRY)
    runs = zoo.run_models(base, ["vit_base_patch16_224.dino", "random-init:vit_small_patch14_reg4_dinov2.lvd142m"],
                          progress=False)           # the second: the dry run's cached folders
    assert [r.available for r in runs] == [False, True]
    assert runs[0].reason.startswith("pretrained weights for model 'vit_base_patch16_224.dino' are not available")
    tables = rz.collect(runs, n_boot=20)
    wide = rz.wide_claims(tables)
    dino = wide[runs[0].model.label]
    assert dino.iloc[0].startswith("weights unavailable: pretrained weights for model 'vit_base_patch16_224.dino'")
    assert set(dino.iloc[1:]) == {"-"}
    st = rz.stage_table(tables)
    assert st.stages.iloc[0].startswith("weights unavailable")
    alone = rz.collect(runs[:1], n_boot=20)          # no model ran: tables and figures still say so
    assert rz.wide_claims(alone).claim.tolist() == ["status"] and alone.curves.empty
    rz.depth_figure(alone.curves, "none")
    rz.stage_figure(alone, "none")
    written = [p.read_text() for p in (offline / "results" / "analysis").glob("*/params.json")]
    assert written and not any('"model": "vit_base_patch16_224.dino"' in t for t in written)   # no folder for it


def test_local_checkpoint_spec_with_its_objective(offline, tmp_path):
    """ARCH@PATH (how notebook 10's encoders join): loaded from the file, labelled as asked."""
    f = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in load_model("random-init:test_vit", seed=5).model.state_dict().items()}, f)
    runs = zoo.run_models(AnalysisParams(**DRY), [{"spec": f"test_vit@{f}", "objective": "MAE-guided", "name": "guided s0"}],
                          progress=False)
    assert runs[0].available and not runs[0].skipped_controls
    assert ("random-init", False) in runs[0].runs           # a trained file keeps the random-init control
    info = json.loads(runs[0].runs[("none", False)].params_json.read_text())["model"]
    assert info["source"] == f"checkpoint:{f}"
    tables = rz.collect(runs, n_boot=20)
    assert tables.status.objective.tolist() == ["MAE-guided"] and tables.labels == ["guided s0 [MAE-guided]"]
    assert "The gap is learned" in " ".join(rz.wide_claims(tables).claim)


def test_a_model_named_twice_is_refused_after_the_dry_run_and_by_label(offline):
    """Two entries that become one model (the dry run makes X and random-init:X the same) or share a
    column name would overwrite each other's claims: refused before anything runs."""
    with pytest.raises(ValueError, match="more than once"):
        zoo.run_models(AnalysisParams(**DRY), ["test_vit", "random-init:test_vit"], dry_run_random_init=True,
                       progress=False)
    with pytest.raises(ValueError, match="more than once"):
        zoo.expand([{"spec": "test_vit@/a.safetensors", "name": "enc"}, {"spec": "test_vit@/b.safetensors", "name": "enc"}])


@pytest.mark.slow      # ~30-60 s (kernel start, 7 models' claims and figures); smoke 09 runs the notebook in `make test`
def test_notebook_09_dry_run_reuses_the_cached_runs(dry, offline):
    """The notebook's smoke mode over the whole zoo, random-init: reads the fixture's folders back."""
    import papermill as pm
    from vitsift_core.reproduce import NOTEBOOKS
    analysis = offline / "results" / "analysis"
    before = sorted(p.name for p in analysis.iterdir())
    out = offline / "reports" / "09_zoo.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(NOTEBOOKS / "09_zoo.ipynb"), str(out), progress_bar=False, cwd=str(NOTEBOOKS.parent),
                        parameters={"profile": "smoke", "models": ["zoo"], "dry_run_random_init": True,
                                    "n_boot": 20, **DRY})
    nb = json.loads(out.read_text())
    assert not [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                if o.get("output_type") == "error"]
    assert sorted(p.name for p in analysis.iterdir()) == before      # nothing recomputed
    for name in ("09_depth", "09_stages"):
        assert (offline / "reports" / "figures" / f"{name}.png").exists()
    wide = pd.read_csv(offline / "reports" / "tables" / "09_claims_by_model.csv")
    assert len(wide.columns) == 2 + 7 and wide.iloc[0, 2:].str.startswith("ok, 2 images").all()
    assert "Dry run: every model has random-init weights" in json.dumps(nb)
