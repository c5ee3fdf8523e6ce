"""`vitsift mask-eval` end to end on tiny models: probe tier, ImageNet-classifier tier, resume."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from vitsift_core.method import masking as MK
from vitsift_core.store import RunMismatch
from vitsift_core.experiments.classify import imagenet_classes, load_classifier
from vitsift_core.cli import main
from vitsift_core.data.sources import read_record, resolve_images
from vitsift_core.data.images import model_input
from vitsift_core.experiments.maskeval import ACC_COLS, PAIRED_COLS, PRED_COLS, MaskEvalParams, run_mask_eval
from vitsift_core.model.registry import load_model
from vitsift_core.model.masked import masked_features
from vitsift_core.experiments.probe import ProbeSettings, train_or_load_probe


def _ckpt(d, num_classes):
    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    p = d / f"test_vit_{num_classes}.safetensors"
    save_file(m.state_dict(), str(p))
    return f"test_vit@{p}"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return _ckpt(tmp_path_factory.mktemp("ckpt"), 1000)       # the probe reads its CLS token, not its head


@pytest.fixture(scope="module")
def in1k(tmp_path_factory):
    return _ckpt(tmp_path_factory.mktemp("ckpt1k"), 1000)     # a tiny 'ImageNet-1k classifier'


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path / "cache"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def labelled(d, classes, n, seed=0):
    """n images per class; each class a different texture, so a probe can learn them."""
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        (d / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.random((64, 64, 3)) * 60).astype(np.uint8)
            if ci % 2 == 0:
                img[::8] = 255                                  # horizontal stripes
            else:
                img[:, ::8] = 255                               # vertical stripes
            img[..., ci % 3] //= 2
            Image.fromarray(img).save(d / c / f"{c}_{i:02d}.png")
    return d


def probe_params(tmp_path, backbone, n_train, n_val, val_seed, **kw) -> MaskEvalParams:
    """Two labelled classes (``n_train`` / ``n_val`` images each) and the probe tier's params on them."""
    train = labelled(tmp_path / "train", ["a", "b"], n_train)
    val = labelled(tmp_path / "val", ["a", "b"], n_val, seed=val_seed)
    return MaskEvalParams(classifier="embedded-probe", model=backbone, images=str(val), probe_train=str(train),
                          probe_per_class=n_train, num_workers=0, device="cpu", **kw)


def cli(*args):
    return main(["mask-eval", "--quiet", "--num-workers", "0", "--batch-size", "4", "--device", "cpu",
                 "--n-boot", "200", *args])


def test_probe_tier_end_to_end(tmp_path, backbone):
    train = labelled(tmp_path / "train", ["cat", "dog"], 6)
    val = labelled(tmp_path / "val", ["cat", "dog"], 3, seed=1)
    out = tmp_path / "out"
    args = ["--model", backbone, "--classifier", "embedded-probe", "--images", str(val),
            "--probe-train", str(train), "--probe-per-class", "5", "--ratios", "0,10,50",
            "--mode", "fill,drop", "--out", str(out)]
    assert cli(*args) == 0
    pred = pd.read_parquet(out / "predictions.parquet")
    acc = pd.read_parquet(out / "accuracy.parquet")
    paired = pd.read_parquet(out / "paired.parquet")
    assert list(pred.columns) == PRED_COLS and list(acc.columns) == ACC_COLS and list(paired.columns) == PAIRED_COLS
    n = 6
    k = len(MK.DEFAULT_ORDERS)                                # top, bottom, random, keypoints, top_other
    assert k == 5 and set(pred.order) == set(MK.DEFAULT_ORDERS)
    assert len(pred) == n * k * 2 * 3 and len(acc) == k * 2 * 3 and len(paired) == k * 2 * 2
    assert (acc.n == n).all()
    assert (acc.ci_low <= acc.top1 + 1e-9).all() and (acc.top1 <= acc.ci_high + 1e-9).all()
    assert set(pred.n_masked) == {0, MK.n_masked_pct(10, 100), MK.n_masked_pct(50, 100)}
    # ratio 0 is the clean prediction for every order and mode
    z = pred[pred.ratio == 0].groupby("image").pred.nunique()
    assert (z == 1).all()
    # the probe: 5 per class, cached; targets are the class folders in sorted order
    info = json.loads((out / "params.json").read_text())
    probe = info["classifier"]["info"]
    assert probe["per_class"] == {"cat": 5, "dog": 5} and probe["classes"] == ["cat", "dog"]
    assert "CLS" in probe["feature"]
    assert set(pred.target) == {0, 1}
    lm = load_model(backbone)
    pr = train_or_load_probe(lm, ProbeSettings(train_images=str(train), per_class=5), progress=False)
    assert pr.info["key"] == probe["key"]                   # loaded from the cache, not retrained
    # one masked prediction recomputed by hand: Top 50 % fill, and Random 10 % drop
    sc = np.load(out / "scores.npz")
    lay = json.loads((out / "layer.json").read_text())
    assert lay["how"].startswith("auto") and len(lay["layers"]) == 1 and lay["captured"] == [1, 2, 3, 4, 5, 6]
    recs = {r.id: r for r in resolve_images(str(val))}
    img = str(sc["ids"][2])
    x = model_input(read_record(recs[img]), lm.data_config)[1][None]
    donor = MK.donor_rows([str(i) for i in sc["ids"]])[2]     # whose map top_other uses for this image
    assert donor != 2
    for order, mode, ratio in (("top", "fill", 50.0), ("random", "drop", 10.0), ("top_other", "fill", 10.0),
                               ("top_other", "drop", 50.0)):
        r = MK.rank_patches(order, scores=sc["scores"][2:3], counts=sc["counts"][2:3], ids=[img],
                            other_scores=sc["scores"][donor:donor + 1])
        idx = MK.mask_indices(r, ratio)
        with torch.inference_mode():
            want = int(pr.logits(masked_features(lm.model, x, mode, idx, lm.grid, lm.patch_size)[:, 0]).argmax())
        got = pred[(pred.image == img) & (pred.order == order) & (pred["mode"] == mode) & (pred.ratio == ratio)]
        assert got.pred.item() == want
    # a second run is a no-op resume with identical tables
    before = (out / "parts" / "score-00000.npz").stat().st_mtime_ns
    assert cli(*args) == 0
    assert (out / "parts" / "score-00000.npz").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(pd.read_parquet(out / "accuracy.parquet"), acc)


def test_imagenet_classifier_tier_maps_wnids(tmp_path, in1k):
    wnids = ["n01440764", "n03888257"]                         # tench, parachute: indices 0 and 701
    val = labelled(tmp_path / "val", wnids + ["not_a_wnid"], 2)
    out = tmp_path / "out"
    assert cli("--classifier", in1k, "--images", str(val), "--ratios", "0,20", "--orders", "top,bottom",
               "--layer", "2", "--out", str(out)) == 0
    pred = pd.read_parquet(out / "predictions.parquet")
    classes = imagenet_classes()
    assert len(classes) == 1000 and classes[0] == "n01440764"
    assert dict(zip(pred.label, pred.target)) == {w: classes.index(w) for w in wnids}
    assert classes.index("n03888257") == 701
    skipped = pd.read_csv(out / "skipped.csv")
    assert len(skipped) == 2 and skipped.reason.str.contains("not a class").all()
    lay = json.loads((out / "layer.json").read_text())
    assert lay["layers"] == [2] and lay["captured"] == [2]
    # clean predictions are the classifier's own argmax over 1000 classes
    lm = load_model(in1k)
    recs = {r.id: r for r in resolve_images(str(val))}
    clean = pred[pred.ratio == 0].drop_duplicates("image")
    xs = torch.stack([model_input(read_record(recs[i]), lm.data_config)[1] for i in clean.image])
    with torch.inference_mode():
        assert (lm.model(xs).argmax(1).numpy() == clean.pred.to_numpy()).all()
    info = json.loads((out / "params.json").read_text())
    assert "probe_train" not in info["identity"] and info["classifier"]["kind"] == "timm"


def test_resume_recomputes_only_missing_chunks(tmp_path, backbone):
    p = probe_params(tmp_path, backbone, 4, 4, 2, ratios=[0, 10, 30], orders=["top", "random"],
                     modes=["fill", "drop"], batch_size=2, n_boot=100, chunk=3)
    a = run_mask_eval(p, tmp_path / "a", progress=False)
    parts = sorted((a.path / "parts").iterdir())
    assert len(parts) == 2 * 3                                   # 8 images in chunks of 3: score + mask files
    (a.path / "parts" / "mask-00001.parquet").unlink()
    (a.path / "parts" / "score-00002.npz").unlink()
    (a.path / "predictions.parquet").unlink()
    kept = {f.name: f.stat().st_mtime_ns for f in (a.path / "parts").iterdir()}
    b = run_mask_eval(p, tmp_path / "a", progress=False)
    for name, t in kept.items():                                 # finished chunks not recomputed
        assert (b.path / "parts" / name).stat().st_mtime_ns == t, name
    assert (b.path / "parts" / "mask-00001.parquet").exists() and (b.path / "parts" / "score-00002.npz").exists()
    c = run_mask_eval(p, tmp_path / "fresh" / "c", progress=False)    # not beside a: computes everything
    assert json.loads((c.path / "run.json").read_text())["score_chunks_reused"] == 0
    pd.testing.assert_frame_equal(b.predictions(), c.predictions())
    pd.testing.assert_frame_equal(b.accuracy(), c.accuracy())
    # other parameters on the same folder: a clear error
    with pytest.raises(RunMismatch, match="ratios"):
        run_mask_eval(p.replace(ratios=[0, 20]), tmp_path / "a", progress=False)


def test_bad_arguments_are_clear_errors(tmp_path, backbone, capsys):
    val = labelled(tmp_path / "val", ["a"], 1)
    assert cli("--model", backbone, "--images", str(val), "--mode", "blur", "--out", str(tmp_path / "o")) == 2
    assert "modes" in capsys.readouterr().err
    headless = load_model("test_vit", control="random-init", model_kwargs={"num_classes": 0})
    with pytest.raises(ValueError, match="1000"):
        load_classifier("test_vit", backbone=headless)


def test_adding_orders_reuses_what_a_run_beside_it_computed(tmp_path, backbone):
    base = probe_params(tmp_path, backbone, 4, 3, 3, ratios=[0, 20], orders=["top"], modes=["fill"],
                        batch_size=3, n_boot=100, chunk=4)
    a = run_mask_eval(base, tmp_path / "runs" / "a", progress=False)
    more = base.replace(orders=["top", "top_other"], ratios=[0, 20, 40], modes=["fill", "drop"])
    assert more.key() != base.key() and more.score_identity() == base.score_identity()
    b = run_mask_eval(more, tmp_path / "runs" / "b", progress=False)
    info = json.loads((b.path / "run.json").read_text())
    assert info["score_chunks_reused"] == 2 and info["score_images"] == 0      # nothing recomputed
    # top fill 20 % is copied from run a (2 chunks); the other 7 conditions are computed for 6 images
    assert info["mask_conditions_reused"] == 2 and info["mask_forwards"] == 6 * 7
    for k in (0, 1):
        assert (b.path / "parts" / f"score-{k:05d}.npz").read_bytes() == \
            (a.path / "parts" / f"score-{k:05d}.npz").read_bytes()
    # the same tables as a run that computed its own score pass
    c = run_mask_eval(more, tmp_path / "alone" / "c", progress=False)
    info_c = json.loads((c.path / "run.json").read_text())
    assert info_c["score_chunks_reused"] == 0 and info_c["mask_forwards"] == 6 * 8
    for k in (0, 1):                                              # the part files themselves agree
        pd.testing.assert_frame_equal(pd.read_parquet(b.path / "parts" / f"mask-{k:05d}.parquet"),
                                      pd.read_parquet(c.path / "parts" / f"mask-{k:05d}.parquet"))
    pd.testing.assert_frame_equal(b.predictions(), c.predictions())
    pd.testing.assert_frame_equal(b.accuracy(), c.accuracy())
    # and Top 20 % fill agrees with the first run's
    key = ["image", "order", "mode", "ratio"]
    top_a = a.predictions().query("order == 'top' and ratio == 20").set_index(key).pred
    top_b = b.predictions().query("order == 'top' and ratio == 20 and mode == 'fill'").set_index(key).pred
    pd.testing.assert_series_equal(top_a, top_b)
    # a run that scores differently (another gamma) shares nothing
    d = run_mask_eval(base.replace(gamma=2.0), tmp_path / "runs" / "d", progress=False)
    info_d = json.loads((d.path / "run.json").read_text())
    assert info_d["score_chunks_reused"] == 0 and info_d["mask_conditions_reused"] == 0


def test_score_collector_gives_the_whole_batch_scores_when_the_batch_is_split_over_cores():
    """The score pass splits its forward over the CPU cores: per-slice scores must land in their
    images' rows (each slice uses its own images' keypoints), stage metrics included."""
    from conftest import sharp_test_vit

    from vitsift_core.model.capture import capture_attention
    from vitsift_core.model.collectors import MetricCollector, PatchScoreCollector
    from vitsift_core.model.cores import forward_on_cores

    model = sharp_test_vit(1)
    torch.manual_seed(4)
    x = torch.randn(5, 3, *model.default_cfg["input_size"][1:])
    counts = torch.randint(0, 3, (5, model.patch_embed.num_patches))
    captured0 = [1, 3]
    got = {}
    for cores in (1, 3):
        col = PatchScoreCollector(captured0, 1.0, True, False, MetricCollector(len(model.blocks)))
        col.start_batch(counts)
        with torch.inference_mode(), capture_attention(model, model.num_prefix_tokens, col):
            forward_on_cores(model.forward_features, x, cores)
        got[cores] = col.finish_batch()
    torch.testing.assert_close(got[3][0], got[1][0], atol=1e-6, rtol=0, equal_nan=True)   # (B, Lc, N)
    for k in got[1][1]:
        torch.testing.assert_close(got[3][1][k], got[1][1][k], atol=1e-6, rtol=0, equal_nan=True)


def test_precision_is_recorded_not_part_of_the_key_and_never_mixed(tmp_path, backbone):
    p = probe_params(tmp_path, backbone, 2, 2, 2, ratios=[0, 30], orders=["top"], modes=["fill"],
                     batch_size=2, n_boot=50, chunk=3)
    bf16 = p.replace(precision="bf16")
    assert bf16.key() == p.key() and "precision" not in p.identity()
    with pytest.raises(ValueError, match="precision"):
        p.replace(precision="fp16")
    a = run_mask_eval(p, tmp_path / "runs" / "a", progress=False)
    info = json.loads((a.path / "params.json").read_text())
    assert info["model"]["forward"] == "fp32" and info["runtime"]["precision"] == "auto"
    with pytest.raises(RunMismatch, match="fp32 forward pass.*bf16-autocast"):
        run_mask_eval(bf16, a.path, progress=False)                 # a resumed run never mixes the two
    out = tmp_path / "runs" / "b"                                   # beside a: its fp32 parts are not reused
    assert cli("--model", backbone, "--images", p.images, "--probe-train", p.probe_train,
               "--probe-per-class", "2", "--ratios", "0,30", "--orders", "top", "--precision", "bf16",
               "--chunk", "3", "--out", str(out)) == 0
    info = {**json.loads((out / "params.json").read_text()), **json.loads((out / "run.json").read_text())}
    assert info["model"]["forward"] == "bf16-autocast" and info["runtime"]["precision"] == "bf16"
    assert info["key"] == a.params.key() and info["score_chunks_reused"] == 0


def test_damaged_parts_are_recomputed_never_merged(tmp_path, backbone, capsys):
    p = probe_params(tmp_path, backbone, 2, 3, 2, ratios=[0, 30], orders=["top", "random"], modes=["fill"],
                     batch_size=2, n_boot=50, chunk=2)
    a = run_mask_eval(p, tmp_path / "a", progress=False)
    want = {f: (a.path / f).read_bytes() for f in ("predictions.parquet", "accuracy.parquet", "scores.npz")}
    parts = a.path / "parts"
    for f in ("mask-00001.parquet", "score-00002.npz"):                 # truncated
        (parts / f).write_bytes((parts / f).read_bytes()[:100])
    shutil.copyfile(parts / "mask-00000.parquet", parts / "mask-00002.parquet")   # another chunk's rows
    (a.path / "run.json").unlink()                                      # as if killed before finishing
    capsys.readouterr()
    b = run_mask_eval(p, tmp_path / "a", progress=False)
    assert {f: (b.path / f).read_bytes() for f in want} == want
    err = [l for l in capsys.readouterr().err.splitlines() if "damaged" in l]
    assert len(err) == 2 and "chunks 2 (unreadable .npz)" in err[0] and "chunks 1 (" in err[1] and "; 2 (" in err[1]
