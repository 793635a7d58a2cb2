"""One ISDA demo lever run: `istr.demo.run_demo(model="isda_tiny")` with overrides of the preset's demo settings,
evaluated every 350 steps (the AP curve), one result line at the end. Runs behind
benchmarks/results/isda_demo_levers.md.

    python benchmarks/isda_levers.py dec3 --seed 0 --model '{"num_decoder_layers": 3}' --train '{"lr": 1e-3}'

--model: create_model overrides on top of the demo's (e.g. mask_stride, num_queries, num_decoder_layers,
first_level, mask_roi_class_gt, timm_kwargs, losses); --train: the demo's training settings (lr, iters,
decay_at, ...). Two runs at a time with --threads 1 each on a 2-core machine (never two with 2 threads).
Writes runs/isda_levers/NAME (the demo's outputs); --data reuses a demo data folder (copied, not regenerated).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from istr.demo import demo_settings, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=json.loads, default={}, help="JSON: model overrides")
    parser.add_argument("--train", type=json.loads, default={}, help="JSON: training-setting overrides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-root", type=Path, default=Path("runs/isda_levers"))
    parser.add_argument("--data", type=Path, default=None, help="an existing demo data folder to copy")
    args = parser.parse_args()
    settings = demo_settings("isda_tiny")  # the preset's own dict: overridden in this process only
    settings["model"].update(args.model)
    settings["train"].update(args.train)
    out = args.out_root / args.name
    out.mkdir(parents=True, exist_ok=True)
    if args.data is not None and not (out / "data").exists():
        shutil.copytree(args.data, out / "data")
    r = run_demo(out, model="isda_tiny", seed=args.seed, threads=args.threads, eval_every=350, progress=False,
                 overwrite=True)
    m = r["metrics"]
    print("RESULT", args.name, args.seed, json.dumps(args.model), json.dumps(args.train),
          "segm %.1f AP50 %.1f AP75 %.1f bbox %.1f s/it %.3f" % (
              100 * m["segm"]["AP"], 100 * m["segm"]["AP50"], 100 * m["segm"]["AP75"], 100 * m["bbox"]["AP"],
              r["seconds_per_iter"]),
          "curve", [round(100 * c["segm_AP"], 1) for c in r["ap_curve"]], flush=True)


if __name__ == "__main__":
    main()
