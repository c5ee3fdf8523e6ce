"""Image recovery with an MAE (paper Sec. 2.1, Fig. 2): regions around the keypoint-densest spot, and
the error of masking the k keypoint-densest patches vs k non-keypoint ones, paired by image."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vitsift_core.method import guided as MM
from vitsift_core.method.stats import bootstrap_ci, mean_ci
from vitsift_core.experiments.mae_data import IMAGENET_MEAN, IMAGENET_STD, ArraySet, to_input
from vitsift_core.experiments.mae_runs import load_pretrained_mae, mae_recipe, run_dir
from vitsift_core.experiments.pretrain import is_complete, run_pretrain
from vitsift_core.model.mae import load_official_mae


CONDITIONS = ("keypoint-dense", "non-keypoint", "random")
#: issue 18's recovery target: masked-patch error / mean-colour fill error on random patches, at every k
RECOVERY_TARGET = 0.75


def to_display(x: torch.Tensor) -> np.ndarray:
    """Normalised (3, S, S) or (B, 3, S, S) -> uint8 (S, S, 3) / (B, S, S, 3) for imshow."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    y = (x.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    y = y.round().to(torch.uint8)
    return (y.permute(0, 2, 3, 1) if y.ndim == 4 else y.permute(1, 2, 0)).numpy()


def _masked_error_parts(mae, x: torch.Tensor, m: torch.Tensor, errors: torch.Tensor):
    """From the model's patch errors (B, N) on x with mask m (B, N): per image (each (B,)) the mean error
    over its masked patches, that error relative to a fill with the visible pixels' mean colour, and the
    fill's mean error on the same patches."""
    vis = 1 - mae.unpatchify(m[..., None].float().expand(-1, -1, mae.patch_size ** 2 * 3))[:, :1]
    colour = (x * vis).sum((2, 3), keepdim=True) / vis.sum((2, 3), keepdim=True)
    target = mae.target(x.float())
    base = torch.zeros_like(target) if mae.norm_pix_loss else mae.patchify(colour.expand_as(x))
    base_err = ((base - target) ** 2).mean(-1)
    mf = m.float()
    return ((errors * mf).sum(1) / mf.sum(1), (errors * mf).sum(1) / (base_err * mf).sum(1).clamp_min(1e-12),
            (base_err * mf).sum(1) / mf.sum(1))


@torch.no_grad()
def _masked_errors(mae, images: np.ndarray, masks: np.ndarray, device, batch_size: int):
    """:func:`_masked_error_parts` of every image (each (n,) NumPy), in batches."""
    parts = []
    for s in range(0, len(images), batch_size):
        x = to_input(images[s:s + batch_size], device)
        m = torch.from_numpy(masks[s:s + batch_size]).to(device)
        parts.append([t.cpu() for t in _masked_error_parts(mae, x, m, mae.reconstruct(x, m)["errors"])])
    return tuple(torch.cat(list(col)).numpy() for col in zip(*parts))


def recovery_errors(mae, arrays: ArraySet, ks=(1, 2, 4, 8), *, seed: int = 0, batch_size: int = 64,
                    device: str | torch.device = "cpu", progress: bool = True) -> pd.DataFrame:
    """Rows (image, k, condition, error, rel_error, fill_error, n_key) of images with >= k keypoint and
    >= k non-keypoint patches (``fill_error``: the mean-colour fill's error on the same patches)."""
    mae = mae.to(device).eval()
    n = mae.num_patches
    if arrays.counts.shape[1] != n:
        raise ValueError(f"counts have {arrays.counts.shape[1]} patches, the MAE {n}")
    rows = []
    for k in tqdm(list(ks), desc="recovery: k", disable=not progress):
        k = int(k)
        sel, masks = [], {c: [] for c in CONDITIONS}
        for i in range(len(arrays)):
            c = arrays.counts[i]
            rng = MM.sample_rng(seed, k, i, MM.STREAM_RECOVERY)
            dense = MM.top_keypoint_patches(c, k, rng)
            non = MM.random_nonkeypoint_patches(c, k, rng)
            if dense is None or non is None:
                continue
            sel.append(i)
            masks["keypoint-dense"].append(MM.patch_set_mask(dense, n))
            masks["non-keypoint"].append(MM.patch_set_mask(non, n))
            masks["random"].append(MM.patch_set_mask(rng.choice(n, size=k, replace=False), n))
        if not sel:
            continue
        imgs = np.asarray(arrays.images[np.asarray(sel)])
        for cond in CONDITIONS:
            err, rel, fill = _masked_errors(mae, imgs, np.stack(masks[cond]), device, batch_size)
            for j, i in enumerate(sel):
                rows.append({"image": arrays.ids[i], "k": k, "condition": cond, "error": float(err[j]),
                             "rel_error": float(rel[j]), "fill_error": float(fill[j]),
                             "n_key": int((arrays.counts[i] > 0).sum())})
    return pd.DataFrame(rows, columns=["image", "k", "condition", "error", "rel_error", "fill_error", "n_key"])


def _ratio_of_sums(v: np.ndarray, axis: int = 0) -> float:
    """v (n, 2) = (error, fill_error) per image -> sum of errors / sum of fill errors."""
    return float(v[:, 0].sum() / max(v[:, 1].sum(), 1e-12))


def relative_error_table(df: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (k, condition) of :func:`recovery_errors` rows, the error relative to the mean-colour fill
    aggregated two ways. ``ratio_of_sums`` = sum of masked-patch errors / sum of the fill's errors over
    the images (= ratio of the two mean errors; percentile bootstrap over images): how much of the fill's
    error the model removes on these patches as a whole. ``mean_ratio`` = mean of per-image ratios (95% t
    CI) and ``median_ratio``: every image weighs the same, so patches the fill already gets almost right
    (flat sky, a small denominator) dominate the mean."""
    out = []
    for (k, cond), g in df.groupby(["k", "condition"], sort=True):
        s, s_lo, s_hi = bootstrap_ci(g[["error", "fill_error"]].to_numpy(), n_boot, seed, stat=_ratio_of_sums)
        m, m_lo, m_hi, n = mean_ci(g.rel_error)
        out.append({"k": int(k), "condition": cond, "n_images": n, "ratio_of_sums": s, "ratio_of_sums_low": s_lo,
                    "ratio_of_sums_high": s_hi, "mean_ratio": m, "mean_ratio_low": m_lo, "mean_ratio_high": m_hi,
                    "median_ratio": float(g.rel_error.median())})
    return pd.DataFrame(out)


def recovery_target(table: pd.DataFrame, target: float = RECOVERY_TARGET, condition: str = "random") -> tuple[bool, str]:
    """(met, Markdown): issue 18's target on :func:`relative_error_table`'s ``ratio_of_sums`` of
    ``condition`` patches at every k (the pooled error over the pooled fill error; the mean of per-image
    ratios, the measure of the issue's own figures, is reported beside it: a few near-flat patches
    make it explode). Met only when every CI's upper end is within the target; point estimates alone
    within it are said as such, not as met (the aggregate was chosen after the first results)."""
    t = table[table.condition == condition].sort_values("k")
    if t.empty:
        raise ValueError(f"no {condition!r} rows in the relative-error table")
    met = bool((t.ratio_of_sums_high <= target).all())
    points = bool((t.ratio_of_sums <= target).all())
    parts = [f"k={int(r.k)}: {r.ratio_of_sums:.2f} [{r.ratio_of_sums_low:.2f}, {r.ratio_of_sums_high:.2f}] "
             f"(mean of per-image ratios {r.mean_ratio:.2f} [{r.mean_ratio_low:.2f}, {r.mean_ratio_high:.2f}], "
             f"median {r.median_ratio:.2f})" for _, r in t.iterrows()]
    head = ("met (every CI within it)" if met else "not met: the point estimates are within it, but not "
            "every CI's upper end" if points else "not met")
    per_image = "within" if (t.mean_ratio <= target).all() else "not within"
    return met, (f"**Recovery target (error / mean-colour fill <= {target} on {condition} patches, summed over "
                 f"images): {head}.** " + "; ".join(parts) + f". The mean of per-image ratios is {per_image} it.")


def recovery_summary(df: pd.DataFrame, value: str = "error", a: str = "keypoint-dense",
                     b: str = "non-keypoint") -> pd.DataFrame:
    """Per k: mean ``value`` (95% t CI) per condition, paired a - b, ratio of means, share a > b."""
    out = []
    for k, g in df.groupby("k"):
        w = g.pivot(index="image", columns="condition", values=value)
        row = {"k": int(k), "n_images": len(w)}
        for cond in [c for c in CONDITIONS if c in w]:
            m, lo, hi, _ = mean_ci(w[cond])
            row.update({f"{cond}": m, f"{cond}_ci": f"[{lo:.4g}, {hi:.4g}]"})
        d = (w[a] - w[b]).to_numpy()
        m, lo, hi, _ = mean_ci(d)
        row.update({f"diff ({a} - {b})": m, "diff_ci_low": lo, "diff_ci_high": hi,
                    f"ratio ({a} / {b})": float(w[a].mean() / w[b].mean()),
                    f"share {a} > {b}": float((d > 0).mean())})
        out.append(row)
    return pd.DataFrame(out)


def _masked_view(mae, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x (B, 3, S, S) with the patches where m (B, N) is True painted mid-grey, in x's normalised space."""
    mm = mae.unpatchify(m[..., None].float().expand(-1, -1, mae.patch_size ** 2 * 3))
    grey = torch.tensor([(0.5 - mu) / sd for mu, sd in zip(IMAGENET_MEAN, IMAGENET_STD)],
                        device=x.device).view(1, 3, 1, 1)
    return x * (1 - mm) + grey * mm


@torch.no_grad()
def region_examples(mae, arrays: ArraySet, indices, small: int, large: int,
                    device: str | torch.device = "cpu") -> list[dict]:
    """Per image index, small and large square regions on the keypoint-densest window: original,
    masked, reconstruction (uint8) and the region's error."""
    mae = mae.to(device).eval()
    out = []
    for i in indices:
        c = arrays.counts[i]
        center = MM.densest_window(c, mae.grid, small)
        x = to_input(np.asarray(arrays.images[i:i + 1]), device)
        for name, size in (("small", small), ("large", large)):
            patches = MM.square_region(mae.grid, center, size)
            m = torch.from_numpy(MM.patch_set_mask(patches, mae.num_patches))[None].to(device)
            r = mae.reconstruct(x, m)
            out.append({"index": int(i), "id": arrays.ids[i], "region": name, "size": size,
                        "center": center, "n_patches": len(patches),
                        "keypoints_in_region": int(c[patches].sum()),
                        "error": float(r["errors"][0][m[0]].mean()),
                        "original": to_display(x[0]), "masked": to_display(_masked_view(mae, x, m)[0]),
                        "reconstruction": to_display(r["pasted"][0])})
    return out


@torch.no_grad()
def random_mask_examples(mae, arrays: ArraySet, indices, ratio: float, *, seed: int = 0,
                         device: str | torch.device = "cpu") -> list[dict]:
    """MAE's own figure: per image index, a random ``ratio`` of the patches hidden (drawn from (seed, image));
    original, masked, the model's prediction of the hidden patches (visible ones grey: the loss never
    trains them), the visible pixels pasted back (uint8), and the hidden patches' error relative to the
    visible-mean-colour fill."""
    mae = mae.to(device).eval()
    out = []
    for i in indices:
        m_np = MM.random_mask(mae.num_patches, ratio, MM.sample_rng(seed, 0, int(i), MM.STREAM_RECOVERY))
        x = to_input(np.asarray(arrays.images[i:i + 1]), device)
        m = torch.from_numpy(m_np)[None].to(device)
        r = mae.reconstruct(x, m)
        err, rel, _ = _masked_error_parts(mae, x, m, r["errors"])      # from this reconstruction: one forward
        out.append({"index": int(i), "id": arrays.ids[i], "ratio": ratio, "error": float(err[0]),
                    "rel_error": float(rel[0]), "original": to_display(x[0]),
                    "masked": to_display(_masked_view(mae, x, m)[0]),
                    "prediction": to_display(_masked_view(mae, r["pred_img"], ~m)[0]),
                    "reconstruction": to_display(r["pasted"][0])})
    return out


def mae_for_recovery(checkpoint: str = "", *, profile: str = "embedded", mask: str = "random", seed: int = 0,
                     device: str = "cpu", progress: bool = True, **override):
    """(MAE, where it comes from): an official ``checkpoint`` file, else the ``mask``/``seed`` run of
    ``profile``'s recipe, trained now if missing (``override``: its runtime keys)."""
    if checkpoint:
        m = load_official_mae(checkpoint, device=device)
        if not m.has_decoder:
            raise ValueError(f"{checkpoint} is an encoder-only checkpoint: recovery needs the decoder "
                             "(use mae_visualize_vit_base.pth / _large.pth)")
        return m, f"official MAE checkpoint {checkpoint}"
    cfg = mae_recipe(profile, mask=mask, seed=seed, **override)
    d = run_dir(cfg)
    trained_now = not is_complete(d)
    if trained_now:
        run_pretrain(cfg, d, progress=progress, desc=f"MAE for recovery ({mask}, seed {seed})")
    how = "trained now" if trained_now else "found in results"
    return (load_pretrained_mae(d, device=device),
            f"the {profile} profile's MAE recipe, {mask}-mask run, seed {seed} ({how}: {d})")
