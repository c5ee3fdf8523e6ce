"""MAE decoder on a frozen encoder (notebook 01's default model): the encoder stays bit-identical, the
decoder overfits one image, an interrupted run resumes to the uninterrupted result.

A timm ``test_vit`` at 32 px / 8 px patches stands in for the embedded backbone (same code path:
:class:`FrozenEncoderMAE` wraps any timm ViT); each run is a few seconds of CPU.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vitsift_core.experiments import recovery_decoder as D
from vitsift_core.store import RunFolder, RunMismatch


def encoder(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             dynamic_img_size=False).eval()


def write_folder(d, n: int = 8, size: int = 40):
    """``n`` smooth colour images (one class): something a decoder can learn from its neighbours."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    (d / "a").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        f = rng.uniform(1, 4, 3)
        img = np.stack([np.sin(f[c] * (xx + yy * c) * 3 + i) for c in range(3)], -1) * 90 + 128
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / "a" / f"{i:02d}.png")
    return d


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path / "cache"))
    return write_folder(tmp_path / "imgs")


def cfg_for(folder, **kw) -> D.DecoderConfig:
    base = dict(backbone="test_vit", decoder_dim=32, decoder_depth=1, decoder_heads=2, train_images=str(folder),
                train_limit=None, crop_pct=1.0, mask_ratio=0.75, steps=6, batch_size=4, lr=1e-3, warmup_steps=2,
                val_images=str(folder), val_limit=4, ckpt_every=2, num_workers=0, threads=1)
    base.update(kw)
    return D.DecoderConfig(**base)


def test_frozen_wrapper_keeps_the_encoder_and_its_forward():
    enc = encoder()
    ref = copy.deepcopy(enc)
    m = D.FrozenEncoderMAE(enc, 32, 1, 2)
    for k, v in ref.state_dict().items():          # position embeddings and weights untouched by the init
        assert torch.equal(m.encoder.state_dict()[k], v), k
    assert not any(p.requires_grad for p in m.encoder.parameters())
    assert any(p.requires_grad for p in m.decoder_blocks.parameters())
    m.train()
    assert m.decoder_blocks.training and not m.encoder.training
    x = torch.randn(2, 3, 32, 32)
    lat, _ = m.forward_encoder(x, None)
    torch.testing.assert_close(lat, ref.forward_features(x), atol=1e-6, rtol=1e-6)
    assert not lat.requires_grad


def test_layer_tokens_are_the_hooked_blocks_normed_and_concatenated():
    """``encoder_layers``: the decoder's input is the listed blocks' outputs (caught here by forward hooks
    on a full ``forward_features``), visible tokens only, through the final norm, concatenated."""
    enc = encoder()
    seen = {}
    for i, blk in enumerate(enc.blocks, start=1):
        blk.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        enc.forward_features(x)
    m = D.FrozenEncoderMAE(enc, 32, 1, 2, encoder_layers=(2, 4))
    assert m.decoder_embed.in_features == 2 * m.embed_dim
    lat, _ = m.forward_encoder(x, None)
    ref = torch.cat([enc.norm(seen[2]), enc.norm(seen[4])], -1)
    torch.testing.assert_close(lat, ref, atol=1e-6, rtol=1e-6)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5:13] = True                                        # 8 of 16 patches hidden: 8 + cls tokens
    lat, _ = D.FrozenEncoderMAE(enc, 32, 1, 2, encoder_layers=(3,)).forward_encoder(x, mask)
    assert lat.shape == (2, 1 + 8, m.embed_dim)
    with pytest.raises(ValueError, match="outside the encoder's blocks"):
        D.FrozenEncoderMAE(enc, 32, 1, 2, encoder_layers=(7,))


@pytest.mark.parametrize("layers,cached", [(None, 0), ((2,), 0), ((1, 3, 6), 0), ((2,), 3)])
def test_decoder_training_leaves_the_encoder_bit_identical(folder, tmp_path, layers, cached):
    enc = encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    sha = D.encoder_sha(enc)
    cfg = cfg_for(folder, encoder_layers=layers, masks_per_image=cached)
    out = D.run_decoder(cfg, tmp_path / "run", progress=False, encoder=enc)
    # found again as finished (params.json holds encoder_layers as a JSON list, the config a tuple)
    assert RunFolder(out, cfg).finished() and D.run_decoder(cfg, out, progress=False, encoder=enc) == out
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert D.encoder_sha(enc) == sha
    steps = D.load_steps(out)
    assert len(steps) == 6 and np.isfinite(steps.loss).all()
    curve = D.load_curve(out)
    assert list(curve.step) == [6] and curve.val_rel_error.iloc[0] > 0
    m = D.load_decoder(out, encoder=enc)
    assert not m.training and m.decoder_config.steps == 6 and m.decoder_config.encoder_layers == layers
    # a decoder run refuses other encoder weights
    with pytest.raises(RunMismatch, match="other test_vit weights"):
        D.load_decoder(out, encoder=encoder(seed=1))


@pytest.mark.parametrize("cached", [0, 8])
def test_decoder_overfits_one_image(tmp_path, monkeypatch, cached):
    """One image, random 75 % masks (a new one every step, or 8 cached ones): the masked-patch loss
    falls to a small fraction."""
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path / "cache"))
    one = write_folder(tmp_path / "one", n=1)
    cfg = cfg_for(one, decoder_dim=64, decoder_depth=2, decoder_heads=4, batch_size=1, steps=300, lr=2e-3,
                  warmup_steps=10, weight_decay=0.0, flip=False, val_limit=1, ckpt_every=300,
                  masks_per_image=cached)
    out = D.run_decoder(cfg, tmp_path / "run", progress=False, encoder=encoder())
    loss = D.load_steps(out).loss.to_numpy()
    first, last = loss[:5].mean(), loss[-20:].mean()
    print(f"frozen-encoder decoder overfit: first {first:.4f} last {last:.5f}")
    assert last < 0.05 * first and last < 0.05, (first, last)


@pytest.mark.parametrize("cached", [0, 2])
def test_resume_after_interruption_gives_the_uninterrupted_run(folder, tmp_path, cached):
    cfg = cfg_for(folder, steps=7, ckpt_every=3, masks_per_image=cached)
    ref = D.run_decoder(cfg, tmp_path / "ref", progress=False, encoder=encoder())

    class Stop(Exception):
        pass

    def stop_at_5(step):
        if step == 5:
            raise Stop

    out = tmp_path / "cut"
    with pytest.raises(Stop):
        D.run_decoder(cfg, out, progress=False, encoder=encoder(), on_step=stop_at_5)
    assert not (out / "run.json").exists() and len(D.load_steps(out)) == 3     # checkpoint at step 3
    D.run_decoder(cfg, out, progress=False, encoder=encoder())
    import json
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == 3
    for f in ("steps.csv", "curve.csv"):
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    a, b = D.load_decoder(ref, encoder=encoder()), D.load_decoder(out, encoder=encoder())
    for k, v in a.decoder_state().items():
        assert torch.equal(v, b.decoder_state()[k]), k
    # finished: nothing to do; another config in the folder: refused
    assert D.run_decoder(cfg, out, progress=False, encoder=encoder()) == out
    with pytest.raises(RunMismatch):
        D.run_decoder(cfg.replace(seed=3), out, progress=False, encoder=encoder())


def test_step_batches_depend_on_seed_and_step_only(folder):
    from vitsift_core.experiments.mae_data import prepare_arrays
    cfg = cfg_for(folder, batch_size=3)
    arr = prepare_arrays(str(folder), None, 32, 8, 1.0, {}, num_workers=0, progress=False)
    a_img, a_m = D.step_batch(cfg, arr, 4, 16, (4, 4))
    b_img, b_m = D.step_batch(cfg, arr, 4, 16, (4, 4))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_m, b_m)
    assert (a_m.sum(1) == 12).all()                      # 75 % of 16 patches
    full = cfg.replace(batch_size=len(arr))              # every image in every step: only the step differs
    s0, s1 = D.step_batch(full, arr, 0, 16, (4, 4))[1], D.step_batch(full, arr, 1, 16, (4, 4))[1]
    assert not np.array_equal(s0, s1)                   # a new mask for the same image at the next step
    # the steps of an epoch cover distinct images
    per_epoch = len(arr) // 3
    seen = [D.step_batch(cfg.replace(flip=False), arr, s, 16, (4, 4))[0] for s in range(per_epoch)]
    flat = np.concatenate(seen).reshape(per_epoch * 3, -1)
    assert len({r.tobytes() for r in flat}) == per_epoch * 3


def test_lr_warmup_then_constant():
    cfg = D.DecoderConfig(lr=1e-3, warmup_steps=4)
    assert [D.lr_at(cfg, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert D.lr_at(cfg.replace(warmup_steps=0), 0) == 1e-3


def test_config_identity_and_checks():
    a = D.DecoderConfig(threads=1, eval_every=10)
    assert a.key() == D.DecoderConfig(threads=2, device="cpu", val_limit=7).key()
    assert a.key() != D.DecoderConfig(steps=a.steps + 1).key()
    with pytest.raises(ValueError):
        D.DecoderConfig(mask_ratio=1.0)
    with pytest.raises(ValueError):
        D.DecoderConfig(steps=0)
    with pytest.raises(ValueError, match="recovery_model"):
        D.model_for_recovery("big-mae")


def test_encoder_layers_identity():
    """The last-block default keeps the key runs had before the option (pinned: computed on the code
    without it); any layer list is a new run; lists are sets of 1-based blocks."""
    base = D.DecoderConfig(encoder_precision="fp32")
    assert "encoder_layers" not in base.identity()
    assert base.key() == "bf9396ef0824" == base.replace(encoder_layers=None).key()
    six = base.replace(encoder_layers=[6])
    assert six.key() != base.key() and six.identity()["encoder_layers"] == (6,)
    assert base.replace(encoder_layers=[12, 4, 8, 8]).key() == base.replace(encoder_layers=(4, 8, 12)).key()
    assert base.replace(encoder_layers=[4, 8, 12]).key() not in {six.key(), base.key()}
    with pytest.raises(ValueError, match="1-based"):
        D.DecoderConfig(encoder_layers=[0, 3])
    with pytest.raises(ValueError, match="1-based"):
        D.DecoderConfig(encoder_layers=[])


def test_recovery_errors_on_a_patch14_frozen_model():
    """notebook 01's paired analysis and mean-colour baseline on a 14 px patch grid (the embedded
    model's patch): the relative error of a row equals the hand-computed masked MSE / fill MSE."""
    from vitsift_core.experiments import recovery as R
    from vitsift_core.experiments.mae_data import ArraySet, to_input
    from vitsift_core.method import guided as MM
    torch.manual_seed(0)
    enc = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=56, patch_size=14,
                            dynamic_img_size=False)
    m = D.FrozenEncoderMAE(enc, 32, 1, 2).eval()
    assert m.grid == (4, 4) and m.patch_size == 14
    rng = np.random.default_rng(1)
    n = 6
    counts = (rng.poisson(1.0, (n, 16)) * (rng.random((n, 16)) < 0.5)).astype(np.int32)
    arr = ArraySet(ids=[f"im{i}" for i in range(n)], images=rng.integers(0, 256, (n, 56, 56, 3), dtype=np.uint8),
                   counts=counts, labels=["a"] * n, skipped=[])
    df = R.recovery_errors(m, arr, ks=(2,), progress=False)
    row = df[df.condition == "keypoint-dense"].iloc[0]
    i = arr.ids.index(row.image)
    patches = MM.top_keypoint_patches(counts[i], 2, MM.sample_rng(0, 2, i, MM.STREAM_RECOVERY))
    x = to_input(arr.images[i:i + 1])
    mask = torch.from_numpy(MM.patch_set_mask(patches, 16))[None]
    with torch.no_grad():
        loss, _, _ = m(x, mask)
    t = m.patchify(x)[0]                                      # (16, 14 * 14 * 3)
    colour = t[~mask[0]].reshape(-1, 3).mean(0)
    base = ((t[mask[0]].reshape(2, -1, 3) - colour) ** 2).mean()
    assert row.error == pytest.approx(float(loss), rel=1e-5)
    assert row.rel_error == pytest.approx(float(loss) / float(base), rel=1e-4)
    assert row.fill_error == pytest.approx(float(base), rel=1e-4)


def test_relative_error_table_aggregates_two_ways_by_hand():
    """ratio of sums = sum(error) / sum(fill); mean ratio = mean of error / fill per image."""
    import pandas as pd
    from vitsift_core.experiments import recovery as R
    err, fill = [1.0, 2.0, 0.1], [2.0, 2.0, 0.01]          # the third: a flat patch the fill nearly gets
    df = pd.DataFrame({"image": ["a", "b", "c"], "k": 1, "condition": "random", "error": err,
                       "rel_error": np.divide(err, fill), "fill_error": fill, "n_key": 0})
    t = R.relative_error_table(df, n_boot=200)
    r = t.iloc[0]
    assert r.ratio_of_sums == pytest.approx(3.1 / 4.01)
    assert r.mean_ratio == pytest.approx((0.5 + 1.0 + 10.0) / 3)
    assert r.median_ratio == pytest.approx(1.0)
    assert r.ratio_of_sums_low <= r.ratio_of_sums <= r.ratio_of_sums_high and r.n_images == 3


def test_recovery_target_both_ways():
    import pandas as pd
    from vitsift_core.experiments import recovery as R
    rows = [{"k": k, "condition": c, "n_images": 9, "ratio_of_sums": v, "ratio_of_sums_low": v - .05,
             "ratio_of_sums_high": v, "mean_ratio": 2.0, "mean_ratio_low": 1.0, "mean_ratio_high": 3.0,
             "median_ratio": .7} for k, v in ((1, .70), (4, .75)) for c in ("random", "keypoint-dense")]
    met, text = R.recovery_target(pd.DataFrame(rows))
    assert met and "met (every CI within it)" in text and "k=4: 0.75" in text and "per-image ratios is not within" in text
    rows[2]["ratio_of_sums_high"] = 0.80                   # point estimate within, CI not: not met
    met, text = R.recovery_target(pd.DataFrame(rows))
    assert not met and "point estimates are within it" in text
    rows[2]["ratio_of_sums"] = rows[2]["ratio_of_sums_high"] = 0.76   # random, k=4 just above the target
    met, text = R.recovery_target(pd.DataFrame(rows))
    assert not met and "not met" in text
    rows[2]["ratio_of_sums"] = rows[2]["ratio_of_sums_high"] = 0.5
    rows[1]["ratio_of_sums"] = rows[1]["ratio_of_sums_high"] = 0.9   # only keypoint-dense above: still met
    assert R.recovery_target(pd.DataFrame(rows))[0]


def test_encoder_precision_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(D, "native_cpu_bf16", lambda: False)
    assert D.encoder_precision(D.DecoderConfig(device="cpu")) == "fp32"
    fp32_key = D.DecoderConfig(device="cpu").key()
    monkeypatch.setattr(D, "native_cpu_bf16", lambda: True)
    assert D.encoder_precision(D.DecoderConfig(device="cpu")) == "bf16"
    assert D.DecoderConfig(device="cpu").key() != fp32_key            # bf16 and fp32 runs never share a folder
    assert D.DecoderConfig(device="cpu").key() == D.DecoderConfig(encoder_precision="bf16").key()
    assert D.encoder_precision(D.DecoderConfig(encoder_precision="fp32")) == "fp32"
    with pytest.raises(ValueError, match="encoder_precision"):
        D.DecoderConfig(encoder_precision="fp16")


def test_bf16_encoder_forward_is_autocast_and_close():
    enc = encoder()
    x = torch.randn(2, 3, 32, 32)
    ref, _ = D.FrozenEncoderMAE(enc, 32, 1, 2).forward_encoder(x, None)
    m = D.FrozenEncoderMAE(enc, 32, 1, 2, encoder_bf16=True)
    lat, _ = m.forward_encoder(x, None)
    assert lat.dtype == torch.float32 and not lat.requires_grad
    assert not torch.equal(lat, ref)                                   # bf16 really ran
    assert float((lat - ref).norm() / ref.norm()) < 0.03
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :8] = True
    loss, _, _ = m(x, mask)                                           # the decoder trains in fp32
    loss.backward()
    assert m.decoder_pred.weight.grad.dtype == torch.float32


def test_cached_pairs_are_fixed_draws_and_the_encoders_own_latents(folder):
    """K masks per image from (seed, copy, image): reproducible, distinct between copies, the configured
    ratio; each cached latent is the frozen encoder's output for that image, flip and mask."""
    from vitsift_core.experiments import decoder_latents as DL
    from vitsift_core.experiments.mae_data import prepare_arrays, to_input
    cfg = cfg_for(folder, masks_per_image=3, mask_ratio=0.5)
    arr = prepare_arrays(str(folder), None, 32, 8, 1.0, {}, num_workers=0, progress=False)
    mask, flip, image = DL.pair_draws(cfg, len(arr), 16)
    again = DL.pair_draws(cfg, len(arr), 16)
    assert np.array_equal(mask, again[0]) and np.array_equal(flip, again[1])
    assert list(image) == list(range(len(arr))) * 3 and (mask.sum(1) == 8).all()
    n = len(arr)
    assert not np.array_equal(mask[:n], mask[n:2 * n])                # copy 1 differs from copy 0
    assert not np.array_equal(mask, DL.pair_draws(cfg.replace(seed=1), n, 16)[0])
    assert flip.any() and not flip.all() and not DL.pair_draws(cfg.replace(flip=False), n, 16)[1].any()
    m = D.build_decoder_model(cfg, encoder())
    lat = DL.encode_pairs(m, arr, cfg, "cpu", progress=False, batch_size=5)
    assert len(lat) == 3 * n and lat.latent.dtype == torch.bfloat16 and lat.latent.shape[1] == 1 + 8
    for p in range(3 * n):
        img = np.array(arr.images[image[p]])
        img = img[:, ::-1] if flip[p] else img
        ref, ids = m.forward_encoder(to_input(img[None]), torch.from_numpy(mask[p:p + 1]))
        assert torch.equal(lat.latent[p:p + 1], ref.to(torch.bfloat16)) and torch.equal(lat.ids_restore[p], ids[0])


def test_masks_per_image_identity():
    base = D.DecoderConfig()
    assert base.replace(masks_per_image=0).key() == base.key()
    assert "masks_per_image" not in base.identity()                  # fresh-mask runs keep their keys
    assert base.replace(masks_per_image=2).key() != base.key() != base.replace(masks_per_image=3).key()
    with pytest.raises(ValueError, match="masks_per_image"):
        D.DecoderConfig(masks_per_image=-1)


def test_random_mask_examples_hide_the_ratio_and_paste_the_visible_pixels(folder):
    from vitsift_core.experiments import recovery
    from vitsift_core.experiments.mae_data import prepare_arrays
    arr = prepare_arrays(str(folder), None, 32, 8, 1.0, {}, num_workers=0, progress=False)
    m = D.FrozenEncoderMAE(encoder(), 32, 1, 2)
    ex = recovery.random_mask_examples(m, arr, [0, 3], 0.5, seed=0)
    assert [e["index"] for e in ex] == [0, 3] and all(e["rel_error"] > 0 for e in ex)
    for e in ex:
        grey = (e["masked"] != e["original"]).any(-1)
        hidden = grey.reshape(4, 8, 4, 8).any((1, 3))              # per 8 px patch of the 32 px image
        assert hidden.sum() == 8                                    # half of the 16 patches
        px = np.repeat(np.repeat(hidden, 8, 0), 8, 1)
        same = e["reconstruction"] == e["original"]
        assert same[~px].all()                                       # the visible pixels pasted back
        assert (e["prediction"][px] == e["reconstruction"][px]).all()    # the hidden patches: the prediction
        assert (e["prediction"][~px] == e["masked"][px].reshape(-1, 3)[0]).all()   # visible ones grey
    assert recovery.random_mask_examples(m, arr, [0], 0.5, seed=0)[0]["error"] == ex[0]["error"]


def test_a_cached_step_is_the_decoder_loss_of_its_own_pairs(folder):
    """The step's loss is the decoder's loss on the pairs batch_indices picks: their images (flipped as
    drawn), their masks and the encoder's latents for exactly those (bf16 as cached); lr 0 moves nothing."""
    from vitsift_core.experiments import decoder_latents as DL
    from vitsift_core.experiments.mae_data import prepare_arrays, to_input
    cfg = cfg_for(folder, masks_per_image=2, batch_size=4)
    arr = prepare_arrays(str(folder), None, 32, 8, 1.0, {}, num_workers=0, progress=False)
    m = D.build_decoder_model(cfg, encoder())
    lat = DL.encode_pairs(m, arr, cfg, "cpu", progress=False)
    opt = torch.optim.AdamW(m.parameters(), lr=0.0)
    for step in (0, 3, 5):
        p = D.batch_indices(cfg, len(lat), step)
        x = to_input(DL.pair_images(arr, lat.image[p], lat.flip[p]))
        ref, ids = m.forward_encoder(x, lat.mask[p])
        want = m.decode_loss(x, ref.to(torch.bfloat16).float(), ids, lat.mask[p])[0].item()
        assert D._step(m, opt, cfg, arr, lat, step, 0.0, "cpu") == pytest.approx(want, rel=1e-6, abs=1e-7)
