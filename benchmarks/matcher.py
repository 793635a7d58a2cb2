"""Benchmark: per-image HungarianMatcher vs a DETR-style matcher (one flattened [B*K, sum T] cost matrix).

Both use the same registered cost terms (paper defaults: focal 2, l1 5, giou 2, cosine 2) and a real codec
(PCA fitted on synthetic ellipse masks, M=28, l=60). The script asserts that both give identical
assignments, then prints median wall times and the speedup; --json writes the numbers to a file.

    OMP_NUM_THREADS=1 python benchmarks/matcher.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import istr
from istr.matching import COSTS, DEFAULT_COSTS, HungarianMatcher


def ellipse_masks(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n random filled ellipses on size x size grids, float {0, 1} [n, size, size]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    centre = 0.3 + 0.4 * torch.rand(n, 2, generator=generator)
    radius = 0.15 + 0.35 * torch.rand(n, 2, generator=generator)
    d = ((xx - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2 + \
        ((yy - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2
    return (d <= 1).float()


def random_boxes(n: int, height: float, width: float, generator: torch.Generator) -> torch.Tensor:
    """n valid absolute xyxy boxes inside a height x width image."""
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
    wh = (0.02 + 0.3 * torch.rand(n, 2, generator=generator)) * torch.tensor([width, height])
    return torch.cat([xy, (xy + wh).minimum(torch.tensor([width, height]))], 1)


def make_problem(batch: int, queries: int, classes: int, num_targets: int | list[int], codec, seed: int = 0):
    """Random predictions and targets; num_targets: per-image count (int) or a list of B counts."""
    g = torch.Generator().manual_seed(seed)
    counts = [num_targets] * batch if isinstance(num_targets, int) else list(num_targets)
    height, width = 800.0, 1088.0  # one size for all images: the flattened matcher normalises l1 by it
    outputs = {"logits": torch.randn(batch, queries, classes, generator=g) - 2.0,
               "boxes": torch.stack([random_boxes(queries, height, width, g) for _ in range(batch)]),
               "mask_embeds": torch.randn(batch, queries, codec.dim, generator=g)}
    targets = []
    for count in counts:
        grids = ellipse_masks(count, codec.mask_size, g)
        targets.append({"boxes": random_boxes(count, height, width, g),
                        "labels": torch.randint(0, classes, (count,), generator=g),
                        "mask_grids": grids, "mask_embeds": codec.encode(grids),  # as SetCriterion provides
                        "image_size": torch.tensor([height, width])})
    return outputs, targets


@torch.no_grad()
def detr_style_match(costs: dict, outputs: dict, targets: list, codec) -> list:
    """DETR's layout: one [B*K, sum T] matrix from the same cost terms, split per image, scipy per image.
    Assumes every image has the same image_size (true in this benchmark)."""
    batch, queries = outputs["boxes"].shape[:2]
    pred = {k: v.flatten(0, 1) for k, v in outputs.items()}
    tgt = {k: torch.cat([t[k] for t in targets]) for k in ("boxes", "labels", "mask_grids", "mask_embeds")}
    tgt["image_size"] = targets[0]["image_size"]
    total = sum(w * COSTS.get(name)(pred, tgt, codec) for name, w in costs.items())
    total = total.view(batch, queries, -1).cpu()
    sizes = [len(t["labels"]) for t in targets]
    return [tuple(torch.as_tensor(a, dtype=torch.int64) for a in linear_sum_assignment(c[i].numpy()))
            for i, c in enumerate(total.split(sizes, -1))]


def median_times(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function; the functions are run interleaved so that load changes on a shared
    machine affect all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def coco_like_counts(batch: int, seed: int = 0) -> list[int]:
    """Skewed per-image instance counts (geometric, mean about 7, as COCO train2017's 7.3, capped at 50)."""
    rng = np.random.default_rng(seed)
    return [int(min(50, c)) for c in rng.geometric(1 / 7.3, size=batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--targets", type=int, nargs="+", default=[8, 50])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skewed", action="store_true", help="also a batch with COCO-like skewed target counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(123)
    codec = istr.create_codec("pca", mask_size=28, dim=60, whiten=True).fit(ellipse_masks(4000, 28, g))
    matcher = HungarianMatcher(DEFAULT_COSTS)
    cases = [(str(t), t) for t in args.targets] + [("coco-like " + ",".join(map(str, c)), c)
                                                     for c in [coco_like_counts(args.batch)] if args.skewed]
    rows = []
    for label, num_targets in cases:
        outputs, targets = make_problem(args.batch, args.queries, args.classes, num_targets, codec)
        ours = matcher(outputs, targets, codec)
        theirs = detr_style_match(DEFAULT_COSTS, outputs, targets, codec)
        for b, ((i1, j1), (i2, j2)) in enumerate(zip(ours, theirs)):
            assert torch.equal(i1, i2) and torch.equal(j1, j2), f"assignments differ in image {b} (T={label})"
        sizes = [len(t["labels"]) for t in targets]
        path = f"{len(matcher._groups(sizes))} group(s)"
        costs = [matcher.cost_matrix({k: v[b] for k, v in outputs.items()}, targets[b], codec).numpy()
                 for b in range(args.batch)]
        t_ours, t_detr, t_lsa = median_times([lambda: matcher(outputs, targets, codec),
                                              lambda: detr_style_match(DEFAULT_COSTS, outputs, targets, codec),
                                              lambda: [linear_sum_assignment(c) for c in costs]], args.repeats)
        rows.append({"T": label, "ours_ms": 1e3 * t_ours, "detr_style_ms": 1e3 * t_detr,
                     "speedup": t_detr / t_ours, "scipy_only_ms": 1e3 * t_lsa, "identical": True, "path": path})

    print(f"B={args.batch} K={args.queries} C={args.classes} l={codec.dim} costs={DEFAULT_COSTS} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} ({platform.processor() or platform.machine()})")
    print("| T per image | ours ms | DETR-style ms | speedup | scipy LSA alone ms | identical | our groups |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['ours_ms']:.2f} | {r['detr_style_ms']:.2f} | {r['speedup']:.1f}x | "
              f"{r['scipy_only_ms']:.2f} | {r['identical']} | {r['path']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
