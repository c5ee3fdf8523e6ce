"""The donor-keypoints control and paired chance (issue 16): no extra forward pass, a resume-safe
derangement, numbers equal to a slow reference, the synthetic no-semantics model, the hand case."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vitsift_core.data.images import model_input
from vitsift_core.data.sources import read_record, resolve_images
from vitsift_core.experiments import analysis as runs
from vitsift_core.experiments import study
from vitsift_core.experiments.tables import donor_counts, head_rows, layer_table
from vitsift_core.method import metrics as M
from vitsift_core.method.masking import donor_rows
from vitsift_core.method.stats import bootstrap_ci
from vitsift_core.model.capture import attention_maps
from vitsift_core.model.collectors import MetricCollector
from vitsift_core.model.registry import load_model

DONOR = ("donor-keypoints", False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path / "cache"))


def photos(d, n, seed=0):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        img[8 + i % 5:30, 10:40 - i % 7] = rng.integers(0, 255, 3)     # uneven keypoints, differing per image
        Image.fromarray(img).save(d / f"img_{i:03d}.png")
    return d


def params(model, imgs, **kw):
    return runs.AnalysisParams(**{"model": model, "images": str(imgs), "device": "cpu", "num_workers": 0,
                                  "batch_size": 2, "chunk": 4, **kw})


def heads_of(res, v=DONOR):
    return pd.read_parquet(res[v].path / "heads.parquet")


# ------------------------------------------------------------------------------------- unit level
def test_donor_counts_is_a_seeded_derangement():
    counts = np.arange(7)[:, None] * np.ones((1, 5), np.int64)          # row i holds i: who gave what
    ids = [f"im{i}" for i in range(7)]
    d = donor_counts(counts, ids, seed=3)[:, 0]
    assert sorted(d) == list(range(7)) and (d != np.arange(7)).all()    # a permutation, nobody their own
    assert (d == donor_counts(counts, ids, seed=3)[:, 0]).all()
    assert not (d == donor_counts(counts, ids, seed=4)[:, 0]).all()
    # the donor follows the id, not the row order
    perm = np.random.default_rng(0).permutation(7)
    d2 = donor_counts(counts[perm], [ids[i] for i in perm], seed=3)[:, 0]
    assert {ids[perm[k]]: f"im{d2[k]}" for k in range(7)} == {ids[k]: f"im{d[k]}" for k in range(7)}
    assert donor_counts(counts[:1], ids[:1], 0) is None                  # one image: no donor


# ------------------------------------------------------------------------------------- run level
def test_donor_adds_no_forward_pass(tmp_path, tiny_ckpt, monkeypatch):
    imgs = photos(tmp_path / "imgs", 6)
    seen = []        # images through block 0, per variant set

    def counting_load(*a, **k):
        lm = load_model(*a, **k)
        lm.model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
        return lm

    monkeypatch.setattr(runs, "load_model", counting_load)
    calls = []
    real_batch_metrics = runs.batch_metrics
    monkeypatch.setattr(runs, "batch_metrics", lambda *a, **k: calls.append(1) or real_batch_metrics(*a, **k))
    p = params(tiny_ckpt, imgs)
    runs.run_suite(p, {("none", False): tmp_path / "a"}, progress=False)
    alone = (sum(seen), len(calls))
    seen.clear(), calls.clear()
    runs.run_suite(p, {("none", False): tmp_path / "b", DONOR: tmp_path / "c", ("donor-keypoints", True): tmp_path / "d"},
                   progress=False)
    assert alone == (6, 3) and (sum(seen), len(calls)) == alone
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "heads.parquet"),
                                  pd.read_parquet(tmp_path / "b" / "heads.parquet"))


class Interrupt(Exception):
    pass


def test_donor_equals_slow_reference_and_survives_resume_and_batch_size(tmp_path, tiny_ckpt):
    imgs = photos(tmp_path / "imgs", 10)                                 # chunks of 4, 4, 2
    p = params(tiny_ckpt, imgs)
    clean = heads_of(runs.run_suite(p, {DONOR: tmp_path / "clean", ("none", False): tmp_path / "real"},
                                    progress=False))
    other = heads_of(runs.run_suite(p.replace(batch_size=3), {DONOR: tmp_path / "b3"}, progress=False))
    pd.testing.assert_frame_equal(clean, other)

    def stop(k):
        if k == 1:
            raise Interrupt
    with pytest.raises(Interrupt):
        runs.analyze(p.replace(control="donor-keypoints"), tmp_path / "cut", progress=False, on_chunk=stop)
    assert sorted(f.name for f in (tmp_path / "cut" / "parts").glob("*.npz")) == ["00000.npz", "00001.npz"]
    resumed = heads_of({DONOR: runs.analyze(p.replace(control="donor-keypoints", batch_size=4), tmp_path / "cut",
                                            progress=False)})
    pd.testing.assert_frame_equal(clean, resumed)

    # slow reference: each image's own maps, metrics with the counts of its donor within its chunk
    real = pd.read_parquet(tmp_path / "real" / "heads.parquet")
    with np.load(tmp_path / "real" / "keypoints.npz") as z:
        ids, counts = list(z["ids"]), z["counts"]
    lm = load_model(tiny_ckpt)
    recs = {r.id: r for r in resolve_images(str(imgs))}
    maps = attention_maps(lm.model, lm.num_prefix_tokens,
                          torch.stack([model_input(read_record(recs[i]), lm.data_config)[1] for i in ids]))
    by = clean.set_index(["image", "layer", "head"])
    donors_seen = {}
    for start in range(0, len(ids), 4):
        chunk = list(range(start, min(start + 4, len(ids))))
        rows = donor_rows([ids[i] for i in chunk], p.seed)
        for k, i in enumerate(chunk):
            d = chunk[rows[k]]
            assert d != i
            donors_seen[ids[i]] = ids[d]
            for l in range(len(maps)):
                ref = M.head_metrics(maps[l][i:i + 1], torch.from_numpy(counts[d])[None])
                got = by.loc[(ids[i], l + 1)]
                for m in ("theta_kk", "theta_nk", "theta_chance", "focus"):
                    np.testing.assert_allclose(got[m].to_numpy(), ref[m][0].numpy(), atol=1e-5, err_msg=m)
                assert (got.n_key == (counts[d] > 0).sum()).all()
    assert len(set(donors_seen.values())) == len(ids)                   # every image gives once
    # the same maps: focus equals the real run's; the donor's theta differs
    np.testing.assert_array_equal(clean.focus.to_numpy(), real.focus.to_numpy())
    assert not np.allclose(clean.theta_kk, real.theta_kk, equal_nan=True)


def test_one_image_chunk_has_no_donor_and_is_counted(tmp_path, tiny_ckpt):
    imgs = photos(tmp_path / "imgs", 5)                                  # chunks of 2, 2, 1
    res = runs.run_suite(params(tiny_ckpt, imgs, chunk=2), {DONOR: tmp_path / "d"}, progress=False)
    h = heads_of(res)
    last = h[h.image == "img_004.png"]
    assert len(last) == 6 * 2 and last[["theta_kk", "theta_nk", "theta_chance"]].isna().all().all()
    assert (last.n_key == 0).all() and (last.n_non == 0).all() and last.focus.notna().all()
    assert h[h.image != "img_004.png"].theta_chance.notna().all()
    import json
    assert json.loads((res[DONOR].path / "run.json").read_text())["n_no_donor"] == 1
    lt = pd.read_parquet(res[DONOR].path / "layers.parquet")
    assert (lt.n_images == 5).all() and (lt.n_images_kk <= 4).all()


# ------------------------------------------------------------------------------- synthetic model
def _gaussian_maps(grid: int, widths: np.ndarray) -> torch.Tensor:
    """(B, 1, N, N): each query's attention a Gaussian of width widths[b] (patches) around itself."""
    yx = np.stack(np.divmod(np.arange(grid * grid), grid), 1).astype(float)
    d2 = ((yx[:, None] - yx[None]) ** 2).sum(-1)
    a = np.exp(-d2[None] / (2 * widths[:, None, None] ** 2))
    return torch.from_numpy(a / a.sum(-1, keepdims=True)).float()[:, None]


def _blobs(rng, grid: int, n_blobs: int) -> np.ndarray:
    """(N,) keypoint counts: a few random 3x3-ish blobs, placed independently of any map."""
    c = np.zeros((grid, grid), np.int64)
    for _ in range(n_blobs):
        y, x = rng.integers(0, grid, 2)
        c[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] += rng.integers(1, 4)
    return c.reshape(-1)


def test_synthetic_maps_without_semantics_give_no_donor_semantic_part(tmp_path):
    """Issue 16's case: attention a local Gaussian (width 0.7 or 3) around the query, keypoints random
    blobs: real minus donor is ~0, while real minus mean attention (which keeps position + smoothing) is not."""
    rng = np.random.default_rng(0)
    grid, n = 12, 80
    widths = rng.choice([0.7, 3.0], n)
    maps = _gaussian_maps(grid, widths)                                   # (n, 1, N, N)
    counts = np.stack([_blobs(rng, grid, int(rng.integers(2, 6))) for _ in range(n)])
    ids = [f"s{i:03d}" for i in range(n)]
    donor = donor_counts(counts, ids, seed=0)
    col = MetricCollector(1, accumulate_mean=True)
    col.start_batch({"real": (torch.from_numpy(counts), False), "donor": (torch.from_numpy(donor), False)})
    col(0, maps)
    out = col.finish_batch()
    gap = {k: (out[k]["theta_kk"] - out[k]["theta_nk"])[:, 0, 0].numpy() for k in ("real", "donor")}
    # mean attention exactly as the suite computes it: the run's summed map, mean_attention_heads
    run = runs.RunDir(tmp_path / "mean", runs.AnalysisParams(control="mean-attention"))
    run.path.mkdir(parents=True)
    run.add_mean(0, col.attn_sum.numpy(), col.n_summed)
    mean = runs.mean_attention_heads(run, ids, counts, 1)
    gap["mean"] = (mean.theta_kk - mean.theta_nk).to_numpy()
    assert gap["real"].mean() > 0.2                                       # a real KK-NK gap
    sem, lo, hi = bootstrap_ci(gap["real"] - gap["donor"])
    assert lo < 0 < hi and abs(sem) < 0.1 * gap["real"].mean()
    pos, lo, hi = bootstrap_ci(gap["real"] - gap["mean"])
    assert lo > 0 and pos > 2 * abs(sem)


# ------------------------------------------------------------------------------------ paired chance
def test_layer_table_pairs_chance_with_kk_and_nk():
    """3 images, 4 patches, 1 layer, 1 head: A no keypoints, B only keypoint patches, C mixed."""
    counts = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [2, 0, 0, 0]])
    pair = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])   # S_i: {0,1} or {2,3}
    maps = pair.expand(3, 1, 4, 4).contiguous()
    res = {k: v[:, None] for k, v in M.head_metrics(maps, counts).items()}         # (B, L=1, H=1)
    heads = head_rows(["A", "B", "C"], res, counts.numpy())
    # theta_i of C: queries 0, 1 see {0,1}: 2/(2+1); queries 2, 3 see {2,3}: 0 -> KK 2/3, NK (2/3+0+0)/3
    # chance: A 0, B 1, C 2/(2+3) = 0.4;  KK defined on B, C; NK on A, C
    lt = layer_table(heads).iloc[0]
    kk, nk = (1 + 2 / 3) / 2, (0 + 2 / 9) / 2
    assert lt.theta_kk == pytest.approx(kk) and lt.theta_nk == pytest.approx(nk)
    assert lt.chance_kk == pytest.approx(0.7) and lt.chance_nk == pytest.approx(0.2)
    assert lt.kk_minus_chance == pytest.approx(kk - 0.7)                 # 0.1333
    assert lt.nk_minus_chance == pytest.approx(((0 - 0) + (2 / 9 - 0.4)) / 2)
    assert lt.theta_chance == pytest.approx(1.4 / 3)                      # unpaired, over all three
    assert abs((lt.theta_kk - lt.theta_chance) - lt.kk_minus_chance) > 0.2   # what a regression would give
    assert (lt.n_images, lt.n_images_kk, lt.n_images_nk) == (3, 2, 2)
