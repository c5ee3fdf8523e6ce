"""MAE model, official-checkpoint loading, mask generators, k-NN / probe (all tiny, CPU, seconds)."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from vitsift_core.method import guided as MM
from vitsift_core.method.linear import knn_accuracy, knn_predict, linear_probe
from vitsift_core.model.mae import build_mae, load_official_mae, masked_to_ids, sincos_pos_embed_2d


def tiny(**kw):
    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2, seed=0)
    args.update(kw)
    return build_mae("test_vit", **args)


def rand_masks(b, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        out[i, torch.randperm(n, generator=g)[:m]] = True
    return out


# ----------------------------------------------------------------------------- model
def test_shapes_patchify_roundtrip_and_masked_ids():
    m = tiny()
    x = torch.randn(3, 3, 32, 32)
    assert m.grid == (4, 4) and m.num_patches == 16
    p = m.patchify(x)
    assert p.shape == (3, 16, 8 * 8 * 3)
    torch.testing.assert_close(m.unpatchify(p), x)
    # patch (r=1, c=2) is pixels [8:16, 16:24], channel-last inside the patch
    torch.testing.assert_close(p[0, 1 * 4 + 2].reshape(8, 8, 3), x[0, :, 8:16, 16:24].permute(1, 2, 0))
    mask = rand_masks(3, 16, 12)
    keep, restore, v = masked_to_ids(mask)
    assert v == 4 and keep.shape == (3, 4)
    assert not mask.gather(1, keep).any()
    with pytest.raises(ValueError, match="same number"):
        masked_to_ids(torch.tensor([[True, False], [True, True]]))
    loss, pred, _ = m(x, mask)
    assert pred.shape == (3, 16, 192) and loss.ndim == 0


def test_sincos_layout():
    e = sincos_pos_embed_2d(16, (3, 5), n_prefix=1)
    assert e.shape == (16, 16)
    assert torch.all(e[0] == 0)
    # first half depends on the column only, second half on the row only
    g = e[1:].reshape(3, 5, 16)
    torch.testing.assert_close(g[0, :, :8], g[2, :, :8])
    torch.testing.assert_close(g[:, 0, 8:], g[:, 4, 8:])
    assert float(g[0, 0, :4].abs().sum()) == 0.0   # sin(0) = 0 for column 0


def test_loss_only_on_masked_patches(monkeypatch):
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    mask = rand_masks(2, 16, 12, seed=1)
    loss, pred, _ = m(x, mask)
    err = ((pred - m.patchify(x)) ** 2).mean(-1)
    torch.testing.assert_close(loss, err[mask].mean())
    # changing the prediction on visible patches must not change the loss
    real = m.forward_decoder

    def spoiled(latent, ids_restore):
        out = real(latent, ids_restore)
        return torch.where(mask[..., None], out, out + 1e3)

    monkeypatch.setattr(m, "forward_decoder", spoiled)
    loss2, _, _ = m(x, mask)
    torch.testing.assert_close(loss2, loss)


def test_norm_pix_target():
    m = tiny(norm_pix_loss=True)
    x = torch.randn(1, 3, 32, 32) * 3 + 1
    t = m.target(x)
    torch.testing.assert_close(t.mean(-1), torch.zeros(1, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(1, 16), atol=1e-3, rtol=0)


def test_tiny_mae_overfits_one_image(one_torch_thread):
    """Random masks every step; the loss on masked patches falls to a small fraction."""
    torch.manual_seed(0)
    m = tiny(embed_dim=64, decoder_embed_dim=64)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    img = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy])[None] * 1.5
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(300):
        loss, _, _ = m(img, rand_masks(1, 16, 12, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = np.mean(losses[:5]), np.mean(losses[-20:])
    print(f"overfit: first {first:.4f} last {last:.5f}")
    assert last < 0.05 * first and last < 0.05, (first, last)


def test_reconstruct_pastes_visible_pixels():
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    mask = rand_masks(2, 16, 8)
    r = m.reconstruct(x, mask)
    vis = m.unpatchify((~mask)[..., None].float().expand(-1, -1, 192)).bool()
    torch.testing.assert_close(r["pasted"][vis], x[vis])
    assert r["errors"].shape == (2, 16)


def test_features_are_cls_of_unmasked_forward():
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    f = m.features(x)
    ref = m.encoder.forward_features(x)[:, 0]   # timm's own forward on the same weights
    torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- official layout
class OfficialLayoutMAE(nn.Module):
    """The official MaskedAutoencoderViT's parameter names and forward (written here for the test:
    its state_dict() is the official checkpoint layout)."""

    def __init__(self, img=32, patch=8, dim=48, depth=2, heads=3, ddim=32, ddepth=2, dheads=4):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * .02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * .1, requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, ddim) * .02)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, n + 1, ddim) * .1, requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(ddim, dheads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(ddepth)])
        self.decoder_norm = norm(ddim)
        self.decoder_pred = nn.Linear(ddim, patch * patch * 3)
        for mod in self.modules():   # non-trivial norms, so a mix-up would show
            if isinstance(mod, nn.LayerNorm):
                nn.init.normal_(mod.weight, 1.0, 0.2)
                nn.init.normal_(mod.bias, 0.0, 0.2)

    def forward(self, imgs, ids_keep, ids_restore):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x = torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1)
        for b in self.blocks:
            x = b(x)
        latent = self.norm(x)
        x = self.decoder_embed(latent)
        mt = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mt], 1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], 1) + self.decoder_pos_embed
        for b in self.decoder_blocks:
            x = b(x)
        return latent, self.decoder_pred(self.decoder_norm(x))[:, 1:, :]


def test_official_checkpoint_key_mapping(tmp_path):
    torch.manual_seed(3)
    ref = OfficialLayoutMAE().eval()
    sd = ref.state_dict()
    assert "blocks.0.attn.qkv.weight" in sd and "decoder_blocks.1.mlp.fc2.bias" in sd and "mask_token" in sd
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": sd}, path)
    m = load_official_mae(path, num_heads=3, decoder_num_heads=4)
    assert m.has_decoder and m.grid == (4, 4) and len(m.encoder.blocks) == 2 and len(m.decoder_blocks) == 2
    x = torch.randn(2, 3, 32, 32)
    mask = rand_masks(2, 16, 12, seed=5)
    keep, restore, _ = masked_to_ids(mask)
    with torch.no_grad():
        lat_ref, pred_ref = ref(x, keep, restore)
        lat, restore2 = m.forward_encoder(x, mask)
        pred = m.forward_decoder(lat, restore2)
    torch.testing.assert_close(lat, lat_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred, pred_ref, atol=1e-5, rtol=1e-5)

    # encoder-only file (mae_pretrain_vit_*): same encoder, decoder flagged missing
    enc_only = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    enc_only["head.weight"] = torch.zeros(10, 48)   # fine-tune leftovers are ignored
    torch.save({"model": enc_only}, tmp_path / "mae_pretrain_tiny.pth")
    e = load_official_mae(tmp_path / "mae_pretrain_tiny.pth", num_heads=3)
    assert not e.has_decoder
    torch.testing.assert_close(e.features(x), m.features(x))

    bad = dict(sd)
    bad["surprise.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="surprise"):
        load_official_mae(bad, num_heads=3)
    del sd["blocks.1.norm2.weight"]
    with pytest.raises(KeyError, match="encoder tensors"):
        load_official_mae(sd, num_heads=3)


# ----------------------------------------------------------------------------- masks
def test_random_mask_exact_count_and_determinism():
    for n, r in ((64, 0.75), (196, 0.75), (196, 0.5), (16, 0.0), (16, 1.0)):
        m = MM.random_mask(n, r, MM.sample_rng(1, 2, 3))
        assert m.sum() == round(r * n)
    a = MM.random_mask(64, .75, MM.sample_rng(0, 1, 7))
    b = MM.random_mask(64, .75, MM.sample_rng(0, 1, 7))
    c = MM.random_mask(64, .75, MM.sample_rng(0, 2, 7))
    assert (a == b).all() and not (a == c).all()


def test_guided_mask_counts_over_many_random_images():
    rng0 = np.random.default_rng(0)
    seen_fill = {"short_key": 0, "short_non": 0, "exact": 0}
    for trial in range(3000):
        n = int(rng0.choice([16, 49, 64, 196]))
        counts = rng0.poisson(rng0.uniform(0, 3), n) * (rng0.random(n) < rng0.uniform(0, 1))
        ratio = float(rng0.choice([0.25, 0.5, 0.75, 0.9]))
        beta = float(rng0.choice([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0]))
        m = MM.guided_mask(counts, ratio, beta, MM.sample_rng(trial, 0, 0))
        big_m = round(ratio * n)
        m_k = round(beta * big_m)
        n_key, n_non = int((counts > 0).sum()), int((counts == 0).sum())
        assert m.sum() == big_m
        got_k = int((m & (counts > 0)).sum())
        if n_key < m_k:                      # keypoint list short: all of it, rest non-keypoint
            assert got_k == n_key
            seen_fill["short_key"] += 1
        elif n_non < big_m - m_k:            # non-keypoint list short: all of it, rest keypoint
            assert big_m - got_k == n_non
            seen_fill["short_non"] += 1
        else:
            assert got_k == m_k
            seen_fill["exact"] += 1
        assert MM.guided_quota(n_key, n, ratio, beta) == (big_m, got_k, big_m - got_k)
    assert min(seen_fill.values()) > 50, seen_fill


def test_guided_mask_is_uniform_within_lists():
    counts = np.array([0] * 8 + [1] * 8)
    hits = np.zeros(16)
    for s in range(4000):
        hits += MM.guided_mask(counts, 0.5, 0.25, MM.sample_rng(s, 0, 0))   # 2 key, 6 non
    key_rate, non_rate = hits[8:] / 4000, hits[:8] / 4000
    assert np.allclose(key_rate, 2 / 8, atol=0.03) and np.allclose(non_rate, 6 / 8, atol=0.03)


def test_guided_mask_score_order():
    counts = np.array([0, 0, 0, 0, 2, 1, 3, 1])
    scores = np.array([.9, .1, .5, .2, .3, .8, .6, .1])
    m = MM.guided_mask(counts, 0.5, 0.5, MM.sample_rng(0, 0, 0), order="score", scores=scores)
    # 2 keypoint patches with the highest scores (5: .8, 6: .6), 2 non-keypoint with the lowest (1, 3)
    assert set(np.flatnonzero(m)) == {1, 3, 5, 6}
    with pytest.raises(ValueError):
        MM.guided_mask(counts, 0.5, 0.5, MM.sample_rng(0, 0, 0), order="score")


def _drawn_share(n_key: int, n: int, ratio: float, beta: float, seed: int = 0) -> float:
    """Slow reference: draw one guided mask on an image with ``n_key`` keypoint patches, count."""
    counts = np.zeros(n, int)
    counts[np.random.default_rng(seed).permutation(n)[:n_key]] = 3
    m = MM.guided_mask(counts, ratio, beta, MM.sample_rng(seed, 0, 0))
    return (m & (counts > 0)).sum() / m.sum()


def test_realised_share_hand_cases_of_issue_16():
    betas = (0.1, 0.2, 0.3, 0.4, 0.5)
    # 60 % keypoint patches at r = 0.75: squashed to ~0.46-0.50 at every step (8x8 and 14x14 grids)
    for n, n_key, first in ((64, 38, 22 / 48), (196, 118, 69 / 147)):
        s = MM.realised_key_share([n_key], n, 0.75, betas)[0]
        assert s[0] == pytest.approx(first) and s[1] == s[0]        # steps 1 and 2 identical
        assert (s >= 0.45).all() and (s <= 0.51).all() and s[-1] > s[0]
        # ... because at beta = 0.1 and 0.2 every non-keypoint patch is masked
        counts = np.array([1] * n_key + [0] * (n - n_key))
        for b in (0.1, 0.2):
            m = MM.guided_mask(counts, 0.75, b, MM.sample_rng(0, 0, 0))
            assert m[n_key:].all()
    # at r = 0.5 it is squashed at step 1 only (26 non-keypoint patches < quota 29); 50 % follows beta
    assert np.allclose(MM.realised_key_share([38], 64, 0.5, betas)[0], [6 / 32, 6 / 32, 10 / 32, 13 / 32, 16 / 32])
    assert np.allclose(MM.realised_key_share([32], 64, 0.5, betas)[0], [3 / 32, 6 / 32, 10 / 32, 13 / 32, 16 / 32])
    # fill-in raises the share when the non-keypoint list runs short (10 non-keypoint patches, 48 masked) ...
    raised = MM.realised_key_share([54], 64, 0.75, [0.1])[0, 0]
    assert raised == pytest.approx(38 / 48) and raised > 5 / 48
    # ... lowers it when the keypoint list runs short (3 keypoint patches, quota 24), all of them masked
    assert MM.realised_key_share([3], 64, 0.75, [0.5])[0, 0] == pytest.approx(3 / 48)
    assert np.isnan(MM.realised_key_share([3], 64, 0.0, [0.5])[0, 0])           # nothing masked
    with pytest.raises(ValueError):
        MM.realised_key_share([65], 64, 0.75, [0.5])


def test_realised_share_matches_drawn_masks_and_stays_between_beta_and_random():
    rng = np.random.default_rng(1)
    for trial in range(400):
        n = int(rng.choice([16, 49, 64, 196]))
        n_key = int(rng.integers(0, n + 1))
        ratio = float(rng.choice([0.25, 0.5, 0.75, 0.9]))
        beta = float(rng.choice([0.0, 0.1, 0.3, 0.5, 1.0]))
        got = MM.realised_key_share([n_key], n, ratio, [beta])[0, 0]
        assert got == pytest.approx(_drawn_share(n_key, n, ratio, beta, trial))
        nominal, own = round(beta * round(ratio * n)) / round(ratio * n), n_key / n
        assert min(nominal, own) - 1e-12 <= got <= max(nominal, own) + 1e-12   # never past random's share


def test_beta_schedule():
    s = MM.BetaSchedule()
    assert [s(e) for e in (0, 9, 10, 19, 20, 39, 40, 49, 50, 99)] == [.1, .1, .2, .2, .3, .4, .5, .5, .5, .5]
    assert list(MM.BetaSchedule((0.1, 0.3), every=2).values(5)) == [.1, .1, .3, .3, .3]
    with pytest.raises(ValueError):
        MM.BetaSchedule((0.1, 1.5))


def test_patch_sets():
    counts = np.array([0, 5, 0, 2, 0, 0, 1, 0, 3])
    assert list(MM.top_keypoint_patches(counts, 2)) == [1, 8]
    assert MM.top_keypoint_patches(counts, 5) is None          # only 4 keypoint patches
    r = MM.random_nonkeypoint_patches(counts, 3, np.random.default_rng(0))
    assert len(r) == 3 and (counts[r] == 0).all()
    assert MM.random_nonkeypoint_patches(counts, 6, np.random.default_rng(0)) is None
    assert list(MM.patch_set_mask([0, 8], 9).nonzero()[0]) == [0, 8]
    sq = MM.square_region((4, 4), (0, 0), 2)
    assert sorted(sq) == [0, 1, 4, 5]
    assert sorted(MM.square_region((4, 4), (3, 3), 3)) == [5, 6, 7, 9, 10, 11, 13, 14, 15]
    grid = np.zeros((5, 5))
    grid[3, 3] = 10
    assert MM.densest_window(grid.reshape(-1), (5, 5), 1) == (3, 3)


# ----------------------------------------------------------------------------- k-NN / probe
def test_knn_and_probe_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 5
    ytr = torch.arange(60) % 3
    yva = torch.arange(30) % 3
    xtr = centers[ytr] + torch.randn(60, 16, generator=g)
    xva = centers[yva] + torch.randn(30, 16, generator=g)
    assert knn_accuracy(xtr, ytr, xva, yva, 3, k=20) == 1.0
    assert knn_accuracy(xtr, ytr, xva, yva, 3, k=5, temperature=None) == 1.0
    # cosine: scaling a query does not change its prediction
    torch.testing.assert_close(knn_predict(xtr, ytr, xva * 7, 3), knn_predict(xtr, ytr, xva, 3))
    res = linear_probe(xtr, ytr, xva, yva, 3)
    assert res["val_acc"] == 1.0


def test_official_checkpoint_loads_weights_only(tmp_path):
    """Issue 15, case 1: an official training checkpoint's argparse ``args`` is the one class
    allowed; any other pickled object is refused without running it."""
    import argparse
    from conftest import write_malicious_checkpoint
    torch.manual_seed(3)
    sd = OfficialLayoutMAE().eval().state_dict()
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(blr=1.5e-4, model="tiny")},
               tmp_path / "mae_full.pth")
    assert load_official_mae(tmp_path / "mae_full.pth", num_heads=3, decoder_num_heads=4).has_decoder
    marker = tmp_path / "ran"
    evil = write_malicious_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(ValueError, match=r"evil\.pth holds objects other than tensors"):
        load_official_mae(evil, num_heads=3)
    assert not marker.exists()
