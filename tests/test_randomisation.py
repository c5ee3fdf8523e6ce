"""Model randomisation (control (e)): block surgery, the planted-semantics check, caching, the claim."""
import numpy as np
import pandas as pd
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitsift_core.experiments import randomisation as R
from vitsift_core.model.registry import LoadedModel, load_model, seeded
from vitsift_core.report import randomisation as RR

# --------------------------------------------------------------------------- a model with planted semantics
IMG, P, D, DEPTH, PLANTED = 48, 8, 64, 3, 1          # 6 x 6 patches; block 1 (0-based) is the planted one
G = IMG // P
MARK, READ = 1.0, 10.0     # marker strength (channel 0) and how hard the planted q, k read it


def vit() -> VisionTransformer:
    return VisionTransformer(img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=1,
                             mlp_ratio=2.0, num_classes=0).eval()


def planted_vit(noise_seed: int = 0) -> VisionTransformer:
    """Every block an identity with uniform attention (q = k = proj = fc2 = 0), except block PLANTED:
    the patch embedding writes a patch's mean intensity (x 4) into channel 0, position embeddings
    write zero-mean noise into channels 1.., and block PLANTED's q and k read channel 0 (x 6) after
    its LayerNorm, so a bright (marked) patch attends to the other marked patches and only to them;
    an unmarked query (channel 0 = 0 after the norm) attends uniformly."""
    m = vit()
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.patch_embed.proj.weight[0] = MARK / (3 * P * P)
        noise = torch.randn(G * G, D - 1, generator=g)
        m.pos_embed[0, 1:, 1:] = noise - noise.mean(dim=1, keepdim=True)
        for blk in m.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.weight.fill_(1.0)
        qkv = m.blocks[PLANTED].attn.qkv.weight          # (3D, D): rows q, then k, then v
        qkv[0, 0] = READ
        qkv[D, 0] = READ
        m.norm.weight.fill_(1.0)
    return m


def as_loaded(model) -> LoadedModel:
    return LoadedModel(model=model, spec="planted", arch="vit", source="planted", data_config={
        "input_size": (3, IMG, IMG)}, patch_size=P, grid=(G, G), num_prefix_tokens=1)


def marked_images(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n images (3, IMG, IMG): 8-14 random patches bright (1), the rest 0; counts (n, N) = 1..3 on the
    bright patches (the keypoint patches), 0 elsewhere."""
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, 3, IMG, IMG)
    counts = torch.zeros(n, G * G, dtype=torch.long)
    for i in range(n):
        for p in rng.choice(G * G, size=rng.integers(8, 15), replace=False):
            r, c = divmod(int(p), G)
            x[i, :, r * P:(r + 1) * P, c * P:(c + 1) * P] = 1.0
            counts[i, p] = int(rng.integers(1, 4))
    return x, counts, [f"img{i:02d}" for i in range(n)]


def reference(seed: int = 0) -> VisionTransformer:
    """What re-initialised blocks take: timm's own init of the same architecture, seeded (as the
    ``random-init`` control builds a timm model)."""
    return seeded(seed, vit)


@pytest.fixture(scope="module")
def planted_rows():
    x, counts, ids = marked_images()
    donor = counts[R.donor_rows(ids, 0)]
    lm, ref = as_loaded(planted_vit()), reference(0)
    return pd.concat([R.score_step(lm, ref, s, x, counts, donor, ids, batch_size=8, precision="fp32")
                      for s in R.plan_steps(DEPTH)], ignore_index=True)


def test_planted_semantics_found_and_lost_in_the_cascade(planted_rows):
    tab = RR.step_table(planted_rows, n_boot=500).set_index(["kind", "step"])
    lay = RR.layer_semantic(planted_rows).set_index(["kind", "step", "layer"]).semantic
    trained = tab.loc[("cascade", 0)]
    # trained: the gap lives in layer PLANTED + 1 only (identity + uniform elsewhere), all of it semantic
    assert lay[("cascade", 0, PLANTED + 1)] > 0.3
    assert abs(lay[("cascade", 0, 1)]) < 1e-6 and abs(lay[("cascade", 0, 3)]) < 1e-6
    assert trained.semantic_low > 0.1
    # randomising the block after it first changes nothing it sees: layers 1..PLANTED + 1 identical
    before = planted_rows[(planted_rows.kind == "cascade") & (planted_rows.layer <= PLANTED + 1)]
    a = before[before.step == 0].drop(columns="step").reset_index(drop=True)
    b = before[before.step == 1].drop(columns="step").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert tab.loc[("cascade", 1)].semantic_low > 0.1
    # once the planted block is random, the semantic part is gone
    for step in (DEPTH - PLANTED, DEPTH):
        row = tab.loc[("cascade", step)]
        assert row.semantic_low <= 0.02 * trained.semantic or abs(row.semantic) < 0.05 * trained.semantic
        assert abs(lay[("cascade", step, PLANTED + 1)]) < 0.1 * lay[("cascade", 0, PLANTED + 1)]
    # each block alone: only the planted one matters
    assert tab.loc[("single", PLANTED + 1)].semantic < 0.1 * trained.semantic
    for b in set(range(1, DEPTH + 1)) - {PLANTED + 1}:
        assert tab.loc[("single", b)].semantic_low > 0.5 * trained.semantic
    claim = RR.randomisation_claim(tab.reset_index())
    assert claim.holds and claim.value == pytest.approx(tab.loc[("cascade", DEPTH)].semantic)


def test_donor_counts_remove_a_gap_that_is_not_semantic():
    """Counts that follow no image content (the same fixed patches bright in every image and keypoints
    there): real and donor gaps coincide, so the semantic part is 0 although the gap is large."""
    x, counts, ids = marked_images(8)
    x[:] = x[0]
    counts[:] = counts[0]
    lm, ref = as_loaded(planted_vit()), reference(0)
    rows = R.score_step(lm, ref, R.Step("cascade", 0, ()), x, counts, counts[R.donor_rows(ids, 0)], ids)
    tab = RR.step_table(rows, n_boot=50)
    assert tab.gap[0] > 0.1 and tab.semantic[0] == pytest.approx(0.0, abs=1e-7)


def test_randomise_blocks_is_seeded_and_touches_only_the_named_blocks():
    model = planted_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = R.randomise_blocks(model, reference(3), [0, 2])
    again = R.randomise_blocks(model, reference(3), [0, 2])
    other = R.randomise_blocks(model, reference(4), [0, 2])
    ref = reference(3).state_dict()
    for k, v in out.state_dict().items():
        assert torch.equal(model.state_dict()[k], before[k])          # the trained model is untouched
        assert torch.equal(v, again.state_dict()[k])                  # same seed, same weights
        if k.startswith(("blocks.0.", "blocks.2.")):
            assert torch.equal(v, ref[k])
        else:
            assert torch.equal(v, before[k])                          # bit-identical elsewhere
    assert not torch.equal(other.blocks[0].attn.qkv.weight, out.blocks[0].attn.qkv.weight)


def test_plan_steps():
    steps = R.plan_steps(3)
    assert [(s.kind, s.step, s.blocks) for s in steps] == [
        ("cascade", 0, ()), ("cascade", 1, (2,)), ("cascade", 2, (1, 2)), ("cascade", 3, (0, 1, 2)),
        ("single", 1, (0,)), ("single", 2, (1,)), ("single", 3, (2,))]
    assert [s.kind for s in R.plan_steps(2, single=False)] == ["cascade"] * 3


def test_reference_is_the_random_init_control(tiny_ckpt):
    """Re-initialised blocks carry the random-init control's weights for the same seed."""
    ref = R.reference_model(tiny_ckpt, seed=5)
    ctl = load_model(tiny_ckpt, control="random-init", seed=5).model
    assert all(torch.equal(a, b) for a, b in zip(ref.blocks.state_dict().values(), ctl.blocks.state_dict().values()))


# --------------------------------------------------------------------------- the verdict rule
@pytest.mark.parametrize("trained, randomised, holds", [
    ((0.2, 0.15, 0.25), (0.005, -0.01, 0.015), True),     # inside +/- 0.02
    ((0.2, 0.15, 0.25), (0.01, -0.01, 0.03), False),      # upper bound beyond 10 % of 0.2
    ((0.2, 0.15, 0.25), (-0.01, -0.03, 0.01), False),     # lower bound beyond -10 %
    ((0.2, -0.01, 0.4), (0.0, -0.001, 0.001), False),     # nothing to lose: trained CI includes 0
])
def test_vanishes_rule(trained, randomised, holds):
    assert RR.vanishes(trained, randomised) is holds


def test_claim_row_both_outcomes():
    def table(rand):
        return pd.DataFrame({"kind": ["cascade", "cascade"], "step": [0, 12], "semantic": [0.2, rand[0]],
                             "semantic_low": [0.15, rand[1]], "semantic_high": [0.25, rand[2]],
                             "n_images": [64, 63]})
    yes = RR.randomisation_claim(table((0.0, -0.01, 0.01)))
    no = RR.randomisation_claim(table((0.1, 0.05, 0.15)))
    assert yes.holds and not no.holds
    assert (no.value, no.low, no.high, no.n_images) == (0.1, 0.05, 0.15, 63)    # the randomised step's images
    assert yes.section == "4.1" and "vanishes" in yes.claim and "trained: 0.2000" in yes.measured


# --------------------------------------------------------------------------- the cached run
def test_run_is_cached_and_resumed(tiny_ckpt, tmp_path, monkeypatch):
    p = R.RandParams(model=tiny_ckpt, images="samples", limit=3, batch_size=2, num_workers=0, device="cpu",
                     single=False)
    run = R.run_randomisation(p, root=tmp_path, progress=False)
    rows = run.rows()
    n_layers = 6
    assert len(rows) == (n_layers + 1) * 3 * n_layers * 2
    assert set(rows.variant) == {"real", "donor"}
    # a second call reads the run back; a lost step file alone is recomputed
    calls = []
    real_score = R.score_step
    monkeypatch.setattr(R, "score_step", lambda *a, **k: calls.append(a[2]) or real_score(*a, **k))
    assert R.run_randomisation(p, root=tmp_path, progress=False).rows().equals(rows)
    assert calls == []
    (run.path / "run.json").unlink()
    run.step_file(R.Step("cascade", 2, ())).unlink()
    again = R.run_randomisation(p, root=tmp_path, progress=False).rows()
    assert [s.name for s in calls] == ["cascade-02"]
    pd.testing.assert_frame_equal(again, rows)


def test_dedupe_keypoints_reaches_the_randomisation_counts(tiny_ckpt):
    """Notebook 05 passes its dedupe_keypoints to the randomisation as to the analysis."""
    from vitsift_core.model.registry import load_model
    lm = load_model(tiny_ckpt, device="cpu")
    kw = dict(model=tiny_ckpt, images="samples", limit=3, batch_size=2, num_workers=0, device="cpu")
    _, _, every = R.load_inputs(lm, R.RandParams(**kw))
    _, _, once = R.load_inputs(lm, R.RandParams(**kw, dedupe_keypoints=True))
    assert (once <= every).all() and once.sum() < every.sum()
    assert R.RandParams(**kw).key() != R.RandParams(**kw, dedupe_keypoints=True).key()
