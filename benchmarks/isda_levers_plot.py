"""Plot the validation mask-AP curves of isda_levers.py runs beside ISTR's demo -> a PNG.

    python benchmarks/isda_levers_plot.py "demo now, seed 0=runs/isda_levers/fbref_img2" \\
        "demo before, seed 1=runs/isda_levers/base_s1" --out benchmarks/results/isda_demo_curve.png

Each argument is LABEL=RUN_FOLDER (a run folder of isda_levers.py or `istr demo --eval-every N`: its
train/log.jsonl holds the evaluations). ISTR's curve (the demo's settings, seeds 0 and 1) is drawn from its points in
convergence_cpu.md (run C: mask AP at 700 / 1,400 / 2,100 steps on 300 validation images), marked as such.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ISTR_C = {0: [(700, 15.9), (1400, 68.2), (2100, 75.2)], 1: [(700, 15.9), (1400, 64.8), (2100, 73.8)]}


def curve(folder: Path) -> list[tuple[int, float]]:
    """(step, mask AP %) of every evaluation in folder/train/log.jsonl, and the final one in folder/metrics.json."""
    log = folder / "train" / "log.jsonl"
    if not log.is_file():
        raise SystemExit(f"{folder}: expected a run folder with train/log.jsonl, found none")
    points = []
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("event") == "eval":
            points.append((int(entry["iter"]), 100 * entry["metrics"]["segm"]["AP"]))
    if not points:
        raise SystemExit(f"{log}: no evaluation in it (run with evaluations every N steps)")
    final = folder / "metrics.json"  # the demo's own evaluation after the last step
    if final.is_file():
        m = json.loads(final.read_text())
        if m.get("iterations", 0) > points[-1][0]:
            points.append((int(m["iterations"]), 100 * m["metrics"]["segm"]["AP"]))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_FOLDER")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/isda_demo_curve.png"))
    parser.add_argument("--title", default="Demo easy data, 8 images a step, 2-core CPU, 200 validation images")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for run in args.runs:
        label, sep, folder = run.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=RUN_FOLDER, got {run!r}")
        ax.plot(*zip(*curve(Path(folder))), "o-", label=f"ISDA {label}")
    for seed, points in ISTR_C.items():
        ax.plot(*zip(*points), "s--", color="gray", alpha=0.6 + 0.4 * seed,
                label=f"ISTR demo seed {seed} (convergence_cpu.md run C, 300 val images)")
    ax.axhline(65, color="red", lw=0.8, ls=":")
    ax.set_xlabel("training step (8 images)")
    ax.set_ylabel("validation mask AP (%)")
    ax.set_title(args.title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
