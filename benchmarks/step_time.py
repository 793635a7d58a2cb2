"""CPU seconds per training step: this checkout vs an earlier commit vs torchvision Mask R-CNN, side by side.

    python benchmarks/step_time.py --baseline 852437f --threads 2 --rounds 3 --iters 12

The step is the demo's configuration before the easy data (istr_tiny, 20 queries, 128 px images, batch 8,
denoising x2, AdamW, the public Trainer's train_step with data loading) on the hard synthetic set the demo used
then (1,000 images; generated once). The baseline is the same code path of another commit, extracted with
`git archive` into a temporary folder and imported from there. Mask R-CNN is benchmarks/train_budget.py's
R18-FPN on the same data, batch and Trainer. The ISDA row (this checkout only) is `isda_tiny` with its demo's model
settings at the demo's 96 px (the images resized), same data, batch, optimiser and Trainer. Each measurement runs in
its own process, the four alternate for --rounds rounds, and each reports the median of --iters steps after 3 warm-up steps; the table gives the
median over rounds and the ratios. Writes benchmarks/results/step_time_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# a process timing train_step; {build} makes `model` (only API that both the baseline and this checkout offer)
_STEP = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
sys.path.insert(0, sys.argv[5])
import istr
from istr.data import CocoInstances, build_transforms
from istr.engine import TrainConfig, Trainer, coco_mask_grids
data, iters = sys.argv[1], int(sys.argv[3])
train_set = CocoInstances(data + "/train", data + "/annotations/instances_train.json",
                          transforms=build_transforms(True, crop_prob=0.0))
torch.manual_seed(0)
{build}
bf16 = {{"bf16": True}} if sys.argv[6:] == ["bf16"] else {{}}  # only this checkout's row asks for it
cfg = TrainConfig(lr=5e-4, backbone_lr_mult=0.4, batch_size=8, max_iters=1000, warmup_iters=0, milestones=(),
                  seed=0, checkpoint_every=0, log_every=0, eval_at_end=False, progress=False, device="cpu", **bf16)
trainer = Trainer(model, train_set, cfg, out_dir=sys.argv[4])
times, losses = [], []
for i in range(iters + 3):
    t0 = time.perf_counter()
    out = trainer.train_step()
    times.append(time.perf_counter() - t0)
    losses.append(float(out["loss"]))
print(json.dumps({{"median": statistics.median(times[3:]), "times": times[3:], "losses": losses,
                  "istr": istr.__file__}}))
"""
_ISTR_STEP = _STEP.format(build="""
codec = istr.create_codec("pca", mask_size=28, dim=60, whiten=True, logit_space=True)
codec.fit(coco_mask_grids(data + "/annotations/instances_train.json", 28))
model = istr.create_model("istr_tiny", num_classes=train_set.num_classes, codec=codec, num_queries=20, min_size=128,
                          max_size=128, train_min_sizes=None, detections_per_image=50, denoising_groups=2)""")
_ISDA_STEP = _STEP.format(build="""
from istr.models import preset_info
model = istr.create_model("isda_tiny", num_classes=train_set.num_classes, min_size=96, max_size=96,
                          **preset_info("isda_tiny").demo["model"])""")
_MASK_RCNN_STEP = _STEP.format(build="""
from train_budget import build_mask_rcnn
model = build_mask_rcnn(train_set.num_classes, 128)""")


def _run(code: str, pythonpath: Path, data: Path, threads: int, iters: int, work: Path, bf16: bool = False) -> dict:
    """One measurement in its own process -> {"median" (s), "times", "losses" (per step, warm-up included)}."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": str(threads)}
    # cwd outside the checkout: `python -c` puts the working directory first on sys.path, before PYTHONPATH
    out = subprocess.run([sys.executable, "-c", code, str(data), str(threads), str(iters),
                          tempfile.mkdtemp(dir=work), str(REPO / "benchmarks"), *(["bf16"] if bf16 else [])],
                         env=env, capture_output=True, text=True, check=False, cwd=work)
    if out.returncode:
        raise RuntimeError(f"step timing failed ({pythonpath}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["istr"].startswith(str(pythonpath)):
        raise RuntimeError(f"the step imported istr from {result['istr']}, not from {pythonpath}")
    return result


def loss_agreement(a: list[float], b: list[float], tol: float = 1e-4) -> tuple[int, float]:
    """(how many leading steps have losses within `tol` relative of each other, the largest relative difference
    among those steps)."""
    diffs = [abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(a, b)]
    agree = next((i for i, d in enumerate(diffs) if d > tol), len(diffs))
    return agree, max(diffs[:agree], default=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="852437f", help="git commit to compare with (default: 852437f)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=12, help="timed steps per measurement (after 3 warm-up steps)")
    p.add_argument("--work", default=None, help="folder for the data and the baseline tree (default: a temp dir)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--bf16", action="store_true",
                   help="also time this checkout with TrainConfig(bf16=True) (autocast; other numerics, an extra row)")
    args = p.parse_args()

    sys.path.insert(0, str(REPO))
    from istr.data import make_synthetic_coco
    from istr.demo import machine_info

    work = Path(args.work or tempfile.mkdtemp(prefix="istr_step_time_"))
    data = work / "data_hard_128"
    if not (data / "annotations" / "instances_train.json").is_file():
        make_synthetic_coco(data, num_train=1000, num_val=0, image_size=128, seed=0, difficulty="hard",
                            min_objects=2, max_objects=8)
    baseline = work / f"tree_{args.baseline}"
    if not baseline.is_dir():
        baseline.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "istr"], capture_output=True,
                                text=True).stdout.strip())
    measurements = [("baseline", _ISTR_STEP, baseline), ("current", _ISTR_STEP, REPO),
                    ("mask_rcnn", _MASK_RCNN_STEP, REPO), ("isda", _ISDA_STEP, REPO)] \
        + ([("bf16", _ISTR_STEP, REPO)] if args.bf16 else [])
    rows: dict[str, list[float]] = {key: [] for key, _, _ in measurements}
    losses: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for key, code, tree in measurements:
            run = _run(code, tree, data, args.threads, args.iters, work, bf16=key == "bf16")
            rows[key].append(run["median"])
            losses.setdefault(key, run["losses"])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    agree, max_rel = loss_agreement(losses["baseline"], losses["current"])
    bf16_note = "" if "bf16" not in rows else (
        f"\nWith `TrainConfig(bf16=True)` (bfloat16 autocast: an option with other numerics, not the paper's float32) "
        f"this checkout's step is {med['bf16']:.3f} s, {med['bf16'] / med['baseline']:.2f}x the baseline's float32 "
        "step; that depends on the CPU's bfloat16 support.\n")
    result = {"baseline_commit": args.baseline, "current_commit": head + ("+uncommitted" if dirty else ""),
              "threads": args.threads, "rounds": args.rounds, "iters_per_measurement": args.iters,
              "seconds_per_step": rows, "median_seconds_per_step": med,
              "ratio_current_to_baseline": med["current"] / med["baseline"],
              "ratio_current_to_mask_rcnn": med["current"] / med["mask_rcnn"],
              "ratio_isda_to_mask_rcnn": med["isda"] / med["mask_rcnn"],
              "losses_first_round": {"baseline": losses["baseline"], "current": losses["current"]},
              "steps_with_equal_losses": agree, "max_relative_loss_difference": max_rel, "machine": machine_info()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time_cpu.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    table = "\n".join(f"| {name} | " + " | ".join(f"{t:.3f}" for t in rows[key]) + f" | **{med[key]:.3f}** |"
                      for key, name in (("baseline", f"ISTR at {args.baseline}"),
                                        ("current", f"ISTR at {result['current_commit']}"),
                                        ("mask_rcnn", "Mask R-CNN R18-FPN"),
                                        ("isda", f"ISDA isda_tiny, demo settings, 96 px, at "
                                                 f"{result['current_commit']}"),
                                        ("bf16", f"ISTR at {result['current_commit']}, bf16 autocast"))
                      if key in rows)
    md = f"""# Training step time on CPU: ISTR now vs {args.baseline}, ISDA, and Mask R-CNN

`python benchmarks/step_time.py --baseline {args.baseline} --threads {args.threads} --rounds {args.rounds} --iters {args.iters}{' --bf16' if args.bf16 else ''}`:
the demo's configuration before the easy data (istr_tiny, 20 queries, 128 px, batch 8, denoising x2, AdamW, the
public Trainer's train_step with data loading) on the hard synthetic set; seconds per step, median of {args.iters}
steps per process, processes alternating.

| | {' | '.join(f'round {i + 1}' for i in range(args.rounds))} | median |
|---|{'---|' * (args.rounds + 1)}
{table}

**Current / baseline: {result['ratio_current_to_baseline']:.2f}x**; current / Mask R-CNN: {result['ratio_current_to_mask_rcnn']:.2f}x;
ISDA (`isda_tiny` with its demo's settings: masks at stride 2 with the image branch, mask feedback and reference,
the mask-RoI class term, 20 queries, images resized to 96 px) / Mask R-CNN: {result['ratio_isda_to_mask_rcnn']:.2f}x.

Same initialisation and data: the losses of the first {agree} of {len(losses['current'])} steps agree between the
two commits to {max_rel:.1e} relative (the step computes the same function; later a rounding difference can flip a
Hungarian assignment and the runs drift apart, as between any two CPU kernels).
{bf16_note}
Machine: {m['cpu']}, {m['cores']} cores, {args.threads} torch threads ({m['cpu_capability']}), torch {m['torch']};
load average at the end {m.get('load_average_1m')}.
"""
    (out / "step_time_cpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
