# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Training-free first read of ``reference_views``: the nearest-neighbour maps alone with flipped / rotated references.

For every target class, k (2, 4) and reference draw (the very same references as ``resad evaluate``), the two deepest
backbone levels' nearest-neighbour maps (``cos levels`` = ResAD's ``nn2``; ``euc levels pooled`` = PatchCore's matching
per level, 3 x 3 averaged, Euclidean) against a bank of the k images alone, their 4 flips or their 8 dihedral views;
each map over its leave-one-out threshold (a reference against the *other* images' views). Image and pixel AUROC.
No flows, no checkpoint: the offline Lite0 backbone of the setting's config.

    python benchmarks/reference_views_nearest.py shared_pcb_crack_to_tile   # + results/reference_views_nearest_*.csv
"""

import sys
import time

import pandas as pd
import torch
from nearest_maps import _auroc, nearest_distance
from torch.nn import functional as F  # noqa: N812
from verdict_margins import setting_datamodule

from anomalib_resad import ResAD
from anomalib_resad.data.multi_class import CATEGORY_COLUMN, MultiClassDataset
from anomalib_resad.evaluation import _resize_of
from anomalib_resad.references import load_images

torch.set_num_threads(1)
setting = sys.argv[1]


def views(images, mode):
    if mode == "none":
        return images.unsqueeze(1)
    v = [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]
    if mode == "dihedral":
        t = images.transpose(-1, -2)
        v += [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]
    return torch.stack(v, dim=1)  # (k, A, 3, H, W)


def maps_of(query, bank, size, blur, up):
    out = {}
    out["cos levels"] = blur(sum(up(nearest_distance(q, b, "cos"), size) for q, b in zip(query, bank, strict=False)))[
        :, 0
    ]
    pq = [F.avg_pool2d(level, 3, 1, 1) for level in query]
    pb = [F.avg_pool2d(level, 3, 1, 1) for level in bank]
    out["euc levels pooled"] = blur(sum(up(nearest_distance(q, b, "euc"), size) for q, b in zip(pq, pb, strict=False)))[
        :, 0
    ]
    return out


config, seed, dm = setting_datamodule(setting)
resad = ResAD(**config["model"]).eval()
model = resad.model
gen = model.anomaly_map_generator
size = tuple(int(v) for v in resad.input_size)
resad.references.set_pools({n: dm.reference_pool(n) for n in dm.target_categories})
table = dm.test_data.samples
rows = []
start = time.perf_counter()
for draw in range(3):
    for cat in dm.target_categories:
        samples = table[table[CATEGORY_COLUMN] == cat]
        ds = MultiClassDataset(samples, "segmentation", _resize_of(resad))
        loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=ds.collate_fn)
        qfeat, labels, masks = [], [], []
        with torch.no_grad():
            for b in loader:
                im, gm = resad.pre_processor.transform(b.image, b.gt_mask)
                qfeat.append(list(model.feature_extractor(im)[-2:]))
                labels.append(b.gt_label.reshape(-1))
                masks.append(gm.reshape(len(im), *size).bool())
        labels, masks = torch.cat(labels).long(), torch.cat(masks)
        for k in (2, 4):
            sel = resad.references.select(cat, k, seed + draw)
            images = load_images(sel.paths, resad.pre_processor.transform)
            for mode in ("none", "flips", "dihedral"):
                with torch.no_grad():
                    v = views(images, mode)
                    A = v.shape[1]
                    feats = [
                        level.reshape(k, A, *level.shape[1:]) for level in model.feature_extractor(v.flatten(0, 1))[-2:]
                    ]
                    thr = {}
                    for i in range(k):
                        others = [torch.cat([f[:i], f[i + 1 :]]).flatten(0, 1) for f in feats]
                        for n, m in maps_of([f[i, :1] for f in feats], others, size, gen.blur, gen._upsample).items():
                            thr[n] = max(thr.get(n, 0.0), float(m.max()))
                    bank = [f.flatten(0, 1) for f in feats]
                    col = {}
                    for q in qfeat:
                        for n, m in maps_of(q, bank, size, gen.blur, gen._upsample).items():
                            col.setdefault(n, []).append(m / thr[n])
                for n, parts in col.items():
                    vals = torch.cat(parts)
                    rows.append(
                        {
                            "setting": setting,
                            "category": cat,
                            "k": k,
                            "draw": draw,
                            "augment": mode,
                            "variant": n,
                            "pixel_AUROC": _auroc(vals, masks) if masks.any() else float("nan"),
                            "image_AUROC": _auroc(vals.flatten(1).amax(1), labels),
                        }
                    )
            print(f"{cat} k={k} draw={draw} {time.perf_counter() - start:.0f}s", flush=True)
        pd.DataFrame(rows).to_csv(f"results/reference_views_nearest_{setting}.csv", index=False)
f = pd.DataFrame(rows)
t = (
    f.groupby(["variant", "augment", "k", "draw"])[["image_AUROC", "pixel_AUROC"]]
    .mean()
    .groupby(["variant", "augment", "k"])
    .mean()
)
print(t.to_string(float_format=lambda v: f"{100 * v:.1f}"))
