"""Recovery experiment and convergence statistics (tiny MAE, synthetic arrays)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vitsift_core.method import stats as S
from vitsift_core.report import convergence as C
from vitsift_core.experiments import recovery as R
from vitsift_core.model.mae import build_mae
from vitsift_core.experiments.mae_data import ArraySet


def tiny_arrays(n=12, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    counts = rng.poisson(1.0, (n, 16)) * (rng.random((n, 16)) < 0.5)
    counts[0] = 0                      # no keypoint: never eligible
    return ArraySet(ids=[f"im{i}" for i in range(n)], images=imgs, counts=counts.astype(np.int32),
                    labels=["a"] * n, skipped=[])


@pytest.fixture
def mae():
    return build_mae("test_vit", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, seed=0).eval()


def test_recovery_errors_pairs_images_and_masks_right_patches(mae, monkeypatch):
    arr = tiny_arrays()
    seen = []
    real = R._masked_errors

    def spy(m, images, masks, device, bs):
        seen.append(masks.copy())
        return real(m, images, masks, device, bs)

    monkeypatch.setattr(R, "_masked_errors", spy)
    df = R.recovery_errors(mae, arr, ks=(1, 2), progress=False)
    assert set(df.condition) == set(R.CONDITIONS)
    assert "im0" not in set(df.image)
    for k, g in df.groupby("k"):
        sets = [set(x.image) for _, x in g.groupby("condition")]
        assert sets[0] == sets[1] == sets[2]        # same images in every condition
    # masks for k=1: dense ones hit a maximal-count patch, non-keypoint ones a zero-count patch
    dense, non, rnd = seen[0], seen[1], seen[2]
    sel = [i for i in range(len(arr)) if f"im{i}" in set(df[df.k == 1].image)]
    for row, i in enumerate(sel):
        c = arr.counts[i]
        assert dense[row].sum() == non[row].sum() == rnd[row].sum() == 1
        assert c[dense[row]].max() == c.max() and (c[non[row]] == 0).all()
    assert (df.error > 0).all() and (df.rel_error > 0).all()
    s = R.recovery_summary(df)
    assert list(s.k) == [1, 2] and (s.n_images > 0).all()


def test_recovery_error_equals_manual_masked_mse(mae):
    arr = tiny_arrays(4)
    df = R.recovery_errors(mae, arr, ks=(2,), progress=False)
    row = df[(df.condition == "keypoint-dense")].iloc[0]
    i = arr.ids.index(row.image)
    from vitsift_core.method import guided as MM
    rng = MM.sample_rng(0, 2, i, MM.STREAM_RECOVERY)
    patches = MM.top_keypoint_patches(arr.counts[i], 2, rng)
    from vitsift_core.experiments.mae_data import to_input
    x = to_input(arr.images[i:i + 1])
    m = torch.from_numpy(MM.patch_set_mask(patches, 16))[None]
    with torch.no_grad():
        loss, _, _ = mae(x, m)
    assert row.error == pytest.approx(float(loss), rel=1e-5)
    # rel_error: relative to filling the masked patches with the visible pixels' mean colour
    t = mae.patchify(x)[0]                                   # (16, 192), channel-last per patch
    colour = t[~m[0]].reshape(-1, 3).mean(0)
    base = ((t[m[0]].reshape(2, -1, 3) - colour) ** 2).mean()
    assert row.rel_error == pytest.approx(float(loss) / float(base), rel=1e-4)


def test_region_examples(mae):
    arr = tiny_arrays(3)
    ex = R.region_examples(mae, arr, [1, 2], small=1, large=3)
    assert len(ex) == 4 and {e["region"] for e in ex} == {"small", "large"}
    for e in ex:
        assert e["original"].shape == e["masked"].shape == e["reconstruction"].shape == (32, 32, 3)
        assert e["original"].dtype == np.uint8
    # visible pixels are pasted back unchanged (up to rounding)
    e = ex[0]
    assert np.abs(e["original"].astype(int) - e["reconstruction"].astype(int)).reshape(-1, 3).min() == 0
    r, c = e["center"]                       # the 1-patch region is shown mid-grey
    block = e["masked"][r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
    assert np.isin(block, [127, 128]).all()


def test_epochs_to_threshold_and_table():
    assert C.epochs_to_threshold([.1, .3, .5, .45], .44) == 3
    assert C.epochs_to_threshold([.1, .2], .5) is None
    mk = lambda acc: pd.DataFrame({"epoch": np.arange(1, len(acc) + 1), "knn_acc": acc,
                                   "probe_acc": [np.nan] * (len(acc) - 1) + [acc[-1]],
                                   "train_loss": np.linspace(1, .5, len(acc))})
    runs = {("random", 0): mk([.20, .30, .40, .50, .50]), ("guided", 0): mk([.20, .45, .50, .50, .51]),
            ("random", 1): mk([.20, .25, .35, .45, .48]), ("guided", 1): mk([.20, .21, .22, .23, .24])}
    t = C.convergence_table(runs, margin=0.01)
    get = lambda m, s: t[(t["mask"] == m) & (t.seed == s)].iloc[0]
    assert get("random", 0).epochs_to_threshold == 4 and get("guided", 0).epochs_to_threshold == 3
    assert get("random", 1).epochs_to_threshold == 5
    assert not get("guided", 1).reached and get("guided", 1).epochs_to_threshold == 6   # censored
    d = C.paired_differences(t)
    e = d[d.quantity.str.startswith("epochs")].iloc[0]
    assert e.mean_diff == pytest.approx(0.0) and e.n_seeds == 2 and e["censored_guided"] == 1


def test_mean_ci():
    m, lo, hi, n = S.mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and lo == pytest.approx(2 - 4.302653 / np.sqrt(3), rel=1e-5)
    assert np.isnan(S.mean_ci([1.0])[1])
