"""Supervised objective, encoder snapshots and emergence over training (issue 19, items 2-3).

Tiny encoder (timm ``test_vit`` at 32 px) on test_mae_pretrain's synthetic 3-class folder.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from test_mae_pretrain import tiny_cfg, write_synthetic_folder
from vitsift_core import cli
from vitsift_core.experiments import emergence as E
from vitsift_core.experiments import mae_runs as M
from vitsift_core.experiments import pretrain as P
from vitsift_core.experiments.analysis import AnalysisParams
from vitsift_core.experiments.pretrain_state import snapshot_spec, snapshots
from vitsift_core.model.registry import load_model
from vitsift_core.report import emergence as ER


@pytest.fixture
def synth(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VITSIFT_RESULTS", str(tmp_path / "results"))
    return write_synthetic_folder(tmp_path / "synth")


def test_supervised_objective_learns_on_a_tiny_set(synth, tmp_path):
    cfg = tiny_cfg(synth, objective="supervised", epochs=6, blr=5e-3, probe=False)
    m = M.load_metrics(P.run_pretrain(cfg, tmp_path / "sup", progress=False))
    assert list(m.columns) == P.METRIC_COLS + ["head_acc"] and list(m.epoch) == list(range(7))
    loss = m.train_loss.to_numpy()[1:]
    assert loss[-1] < loss[0] - 0.02, loss                     # the loss falls
    chance = 1 / 3                                              # 3 balanced classes
    assert m.head_acc.iloc[-1] > chance + 0.2, m.head_acc.tolist()     # above chance after 6 epochs
    assert m.head_acc.iloc[-1] > m.head_acc.iloc[0], m.head_acc.tolist()
    assert m.key_share.iloc[1:].isna().all()                    # no masks: no keypoint share


def test_objective_in_identity_mae_keys_unchanged():
    mae, sup = P.PretrainConfig(), P.PretrainConfig(objective="supervised")
    assert "objective" not in mae.identity() and "snapshot_every" not in mae.identity()
    assert sup.key() != mae.key() and sup.recipe_key() == mae.recipe_key()    # one recipe, both objectives
    assert sup.identity()["objective"] == "supervised"
    assert sup.replace(decoder_heads=2, mask_ratio=0.5).key() == sup.key()    # MAE-only keys do not count
    assert P.PretrainConfig(snapshot_every=2).key() != mae.key()
    with pytest.raises(ValueError, match="objective"):
        P.PretrainConfig(objective="dino")
    with pytest.raises(ValueError, match="supervised run masks nothing"):
        P.PretrainConfig(objective="supervised", mask="guided")
    assert M.run_dir(sup.replace(seed=2)).name == "supervised-seed2"


def test_supervised_key_covers_what_sets_its_initial_encoder():
    """A field a supervised identity drops must not change the run's numbers, its initial encoder
    included: build_mae draws the decoder's layers from the seeded stream before re-initialising the
    encoder, so decoder_dim and decoder_depth set the encoder's starting weights."""
    sup = P.PretrainConfig(objective="supervised", encoder="test_vit", img_size=32, patch_size=8, depth=1,
                           embed_dim=32, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    ref = P.build_model(sup).encoder.state_dict()
    for change in ({"decoder_dim": 16}, {"decoder_depth": 2}, {"decoder_heads": 2}, {"norm_pix_loss": True},
                   {"mask_ratio": 0.5}):
        other = sup.replace(**change)
        enc = P.build_model(other).encoder.state_dict()
        same = all(torch.equal(ref[k], enc[k]) for k in ref)
        assert same or other.key() != sup.key(), f"{change}: same key, other initial encoder"


class Crash(RuntimeError):
    pass


def test_snapshots_load_through_the_registry_and_survive_a_resume(synth, tmp_path):
    cfg = tiny_cfg(synth, objective="supervised", epochs=4, snapshot_every=3, probe=False)
    ref = P.run_pretrain(cfg, tmp_path / "ref", progress=False)
    assert sorted(snapshots(ref)) == [0, 3, 4]                  # 0, every 3rd, the last

    def crash(step):                                            # dies in epoch 4 (4 steps per epoch)
        if step == 13:
            raise Crash
    with pytest.raises(Crash):
        P.run_pretrain(cfg, tmp_path / "res", progress=False, on_step=crash)
    assert sorted(snapshots(tmp_path / "res")) == [0, 3]
    P.run_pretrain(cfg, tmp_path / "res", progress=False)
    for e, path in snapshots(ref).items():
        a, b = load_file(str(path)), load_file(str(snapshots(tmp_path / "res")[e]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), e
        # byte for byte (header keys sorted), so the content identity of the resumed run's snapshot is the same
        assert path.read_bytes() == snapshots(tmp_path / "res")[e].read_bytes(), e
    # "ARCH@PATH" rebuilds the architecture and its input pipeline from the file alone
    spec = snapshot_spec(snapshots(ref)[4])
    lm = load_model(spec)
    assert spec.startswith("test_vit@") and lm.grid == (4, 4) and lm.data_config["input_size"] == (3, 32, 32)
    assert tuple(lm.data_config["mean"]) == (0.485, 0.456, 0.406) and lm.data_config["crop_pct"] == 0.875
    enc = {k[len("encoder."):]: v for k, v in P.read_checkpoint(ref / "checkpoint.pt")["model"].items()
           if k.startswith("encoder.")}
    mae = P.build_model(cfg)
    mae.encoder.load_state_dict(enc)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(lm.model.forward_features(x), mae.forward_encoder(x)[0], rtol=0, atol=0)


def test_emergence_on_snapshots_equals_vitsift_analyze_by_hand(synth, tmp_path):
    base = tiny_cfg(synth, epochs=2, snapshot_every=1, probe=False)
    runs = E.train(base, objectives=("supervised", "mae-random"), root=tmp_path / "mae", progress=False)
    assert set(E.final_specs(runs)) == {"supervised", "mae-random"}
    params = AnalysisParams(images=str(synth), limit=24, num_workers=0, chunk=12, device="cpu")
    suites = E.analyze_snapshots(runs, params, root=tmp_path / "analysis", progress=False)
    assert sorted(suites) == [(o, e) for o in ("mae-random", "supervised") for e in (0, 1, 2)]
    curves = E.semantic_curves(suites, n_boot=200)
    # by hand: `vitsift analyze` on one snapshot file, real and donor keypoints, into other folders
    spec = snapshot_spec(snapshots(runs["supervised"])[1])
    hand = {}
    for control in ("none", "donor-keypoints"):
        out = tmp_path / f"cli-{control}"
        assert cli.main(["analyze", "--model", spec, "--images", str(synth), "--limit", "24", "--chunk", "12",
                         "--exclude-self", "--control", control, "--num-workers", "0", "--device", "cpu",
                         "--out", str(out), "--quiet"]) == 0
        hand[control] = pd.read_parquet(out / "heads.parquet")
        mine = pd.read_parquet(suites[("supervised", 1)][(control, True)].path / "heads.parquet")
        pd.testing.assert_frame_equal(hand[control], mine)
        pd.testing.assert_frame_equal(pd.read_parquet(out / "layers.parquet"),
                                      pd.read_parquet(suites[("supervised", 1)][(control, True)].path / "layers.parquet"))
    # the semantic part by hand: per image and layer, heads averaged, (KK-NK)(real) - (KK-NK)(donor)
    gap = {c: h.assign(g=h.theta_kk - h.theta_nk).groupby(["image", "layer"]).g.mean().unstack()
           for c, h in hand.items()}
    sem = (gap["none"] - gap["donor-keypoints"]).dropna()
    row = curves[(curves.objective == "supervised") & (curves.epoch == 1)].set_index("layer")
    np.testing.assert_allclose(row.semantic.loc[sem.columns].to_numpy(), sem.mean(axis=0).to_numpy(), rtol=1e-6)
    # both sides start from float32 thetas and round differently, and the mean over layers nearly
    # cancels (~4e-4 from terms ~5e-2): an absolute slack of float32's size beside the relative one
    scale = float(np.abs(sem.to_numpy(np.float64)).mean())
    np.testing.assert_allclose(row.semantic.loc[E.ALL_LAYERS], sem.to_numpy(np.float64).mean(), rtol=1e-6,
                               atol=1e-7 * scale)
    assert (row.low <= row.semantic).all() and (row.semantic <= row.high).all()
    table = E.first_table(curves)
    assert set(table.objective) == {"supervised", "mae-random"} and "all (mean)" in set(table.layer)
    assert "supervised" in ER.verdict(table)
    E.suite_curves(suites)      # the whole suite's curves read back for every snapshot


def _curve(lows, semantic=0.1):
    return pd.DataFrame({"epoch": np.arange(len(lows)) * 2, "semantic": semantic, "low": lows,
                         "high": np.asarray(lows) + 0.2})


def test_first_appearance_rule_both_outcomes():
    assert E.first_appearance(_curve([-0.1, -0.01, 0.02, 0.01, 0.03]))["epoch"] == 4
    # a CI above 0 that does not last to the final snapshot is no appearance (multiple looks)
    assert E.first_appearance(_curve([-0.1, -0.01, 0.02, -0.05, 0.03]))["epoch"] == 8
    assert E.first_appearance(_curve([0.02, 0.03, -0.01])) is None
    assert E.first_appearance(_curve([-0.1, 0.0, -0.01])) is None          # CI touching 0 is not above it
    assert E.first_appearance(_curve([0.05, 0.05], semantic=-0.1)) is None  # a negative part never counts


def test_guided_earlier_rule_both_outcomes():
    assert E.guided_earlier(2, 4)[0] and E.guided_earlier(2, None)[0]
    assert not E.guided_earlier(4, 4)[0] and not E.guided_earlier(6, 4)[0]
    assert not E.guided_earlier(None, 4)[0] and not E.guided_earlier(float("nan"), float("nan"))[0]


def test_choose_size_rule_both_outcomes():
    t = pd.DataFrame({"img_size": [32, 48, 64], "key_share": [0.45, 0.42, 0.41],
                      "key_patches_per_image": [7.1, 15.3, 26.0]})
    assert E.choose_size(t, 0.3, 8) == 48          # 32 px: share fine, too few keypoint patches
    assert E.choose_size(t, 0.3, 5) == 32          # the smallest that passes
    assert E.choose_size(t, 0.5, 5) == 64          # none passes: the largest


def test_keypoint_sizes_counts_patches_on_the_models_crop(synth):
    t = E.keypoint_sizes(str(synth), None, [32, 16], 8, num_workers=0)
    assert list(t.img_size) == [16, 32] and list(t.patches) == [4, 16] and (t.images == 36).all()
    from vitsift_core.experiments.mae_data import prepare_arrays
    c = prepare_arrays(str(synth), None, 32, 8, num_workers=0, progress=False).counts
    assert t.key_patches_per_image.iloc[1] == pytest.approx((c > 0).sum(1).mean())
    assert t.key_share.iloc[1] == pytest.approx((c > 0).mean()) and 0 < t.key_share.iloc[1] < 1


def test_supervised_skipped_without_labels(synth):
    cfg = tiny_cfg(synth)
    assert E.usable_objectives(cfg, list(E.OBJECTIVES))[0] == list(E.OBJECTIVES)
    objs, note = E.usable_objectives(cfg.replace(train_images="samples"), list(E.OBJECTIVES))
    assert objs == ["mae-random", "mae-guided"] and "no class labels" in note


def test_notebook_defaults_are_the_recipe_defaults():
    """emergence.profile_specs (for other notebooks) rebuilds notebook 10's runs from DEFAULTS."""
    from vitsift_core import reproduce as R
    nb = next(p for p in R.notebook_paths() if p.stem == "10_emergence")
    declared = R.declared_parameters(nb)
    for k, v in E.DEFAULTS.items():
        assert eval(declared[k]["default"]) == v, k


def test_verdict_words_follow_the_table():
    t = pd.DataFrame({"objective": ["supervised", "mae-random", "mae-guided"], "layer": ["all (mean)"] * 3,
                      "first_epoch": [0, np.nan, 4], "semantic": [0.01, np.nan, 0.02], "low": [0.005, np.nan, 0.01],
                      "high": [0.02, np.nan, 0.03], "epochs_seen": ["0-10"] * 3})
    text = ER.verdict(t)
    assert "supervised: above 0 already in the untrained encoder" in text and "mae-guided: above 0 from epoch 4 on" in text
    assert "earlier: yes" in text and "never under random masks" in text
    assert "earlier: no" in ER.verdict(t.assign(first_epoch=[0, 2, 4]))
    assert list(ER.first_table_display(t).first_epoch) == ["0 (untrained)", "n.r.", "4"]


def test_profile_specs_reads_the_profile_as_reproduce_passes_it(tmp_path, monkeypatch):
    """Notebook 09's 'trained' encoders are notebook 10's: top-level parameters count, the section wins."""
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "p.yaml").write_text(
        "parameters: {seed: 3, num_workers: 0, limit: 9}\nnotebooks: {10_emergence: {epochs: 4, num_workers: 2}}\n")
    got = {}
    from vitsift_core.experiments import mae_runs
    monkeypatch.setattr(mae_runs, "ROOT", tmp_path)      # the one profile reader: mae_runs.profile_params
    monkeypatch.setattr(E, "setup", lambda profile, **p: got.update(p) or {"base": None, "objectives": [], "seed": p.get("seed", 0)})
    monkeypatch.setattr(E, "train", lambda *a, **k: {})
    assert E.profile_specs("p", progress=False) == {}
    assert (got["seed"], got["epochs"], got["num_workers"]) == (3, 4, 2)


def test_the_same_snapshot_is_the_same_bytes(tmp_path):
    """safetensors writes its metadata in hash-map order; the snapshot's header is rewritten sorted, so
    identical weights and metadata give identical files (and ARCH@PATH identities)."""
    from safetensors import safe_open
    from vitsift_core.experiments import pretrain_state as S
    from vitsift_core.model.registry import checkpoint_identity
    cfg = P.PretrainConfig(encoder="test_vit", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    enc = P.build_model(cfg).encoder
    files = [S.save_snapshot(tmp_path / f"run{i}", enc, cfg, 3) for i in range(6)]
    assert len({f.read_bytes() for f in files}) == 1
    assert len({checkpoint_identity(f"test_vit@{f}") for f in files}) == 1
    with safe_open(str(files[0]), "pt") as g:
        assert g.metadata()["epoch"] == "3" and json.loads(g.metadata()["timm_kwargs"])["depth"] == 1
        assert all(torch.equal(g.get_tensor(k), v) for k, v in enc.state_dict().items())
