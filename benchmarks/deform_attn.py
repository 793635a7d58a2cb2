"""One multi-scale deformable attention layer on CPU, grid_sample vs gather side by side: time and peak memory.

One MultiScaleDeformableAttention (d 256, 8 heads, 4 levels, 4 points, batch 1, fp32) at two input sizes:
  paper  800 x 1333 padded: levels P3..P6 of 100x167, 50x84, 25x42, 13x21 (S = 22223)
  cpu    256 x 256:         levels 32x32, 16x16, 8x8, 4x4 (S = 1360)
as an encoder layer (queries = all S positions, reference points = pixel centres) and as decoder cross-attention
(300 queries, random reference points), its core op run by each implementation of istr.ops.ms_deform_attn:
"grid_sample" (one F.grid_sample per level) and "gather" (one embedding_bag over a bordered channels-last table).
"fwd" runs under no_grad; "fwd+bwd" backpropagates out.sum() into the query, the value input and the parameters;
"bwd" is their difference. Times are medians over --repeats after one warm-up, wall clock and process CPU time.
Peak extra memory is the rise of the process's peak RSS (ru_maxrss) over its RSS just before the first call; each
(case, mode, threads) runs in its own subprocess so that each high-water mark is its own.
With --step, also the isda_tiny training step (istr.create_model("isda_tiny", num_classes=3) with the demo's model
settings: 20 queries, images at 96 px; AdamW, a batch of 8 random 96x96 images with two box-shaped masks each,
1 thread) under each implementation, in alternating processes.

  python benchmarks/deform_attn.py --threads 1 2 --step
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {"paper 800x1333": [(100, 167), (50, 84), (25, 42), (13, 21)],
         "cpu 256x256": [(32, 32), (16, 16), (8, 8), (4, 4)]}
D_MODEL, N_HEADS, N_LEVELS, N_POINTS, N_QUERIES = 256, 8, 4, 4, 300
IMPLS = ("grid_sample", "gather")
CASES = [(size, role) for size in SIZES for role in ("encoder", "decoder")]


def _deformable():
    try:  # the ISDA family folder; older checkouts kept the module at istr.models.deformable
        import istr.models.isda.deformable as deformable
    except ImportError:
        import istr.models.deformable as deformable
    return deformable


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(size: str, role: str, impl: str, mode: str, repeats: int) -> dict:
    from istr.ops.deform_attn import deform_attn_impl

    deformable = _deformable()
    torch.manual_seed(0)
    shapes = SIZES[size]
    s = sum(h * w for h, w in shapes)
    attn = deformable.MultiScaleDeformableAttention(D_MODEL, N_LEVELS, N_HEADS, N_POINTS)
    with torch.no_grad():  # trained-looking offsets and attention (the init's are all alike)
        attn.sampling_offsets.weight.normal_(0, 0.02)
        attn.attention_weights.weight.normal_(0, 0.02)
    lq = s if role == "encoder" else N_QUERIES
    grad = mode == "fwd+bwd"
    query = torch.randn(1, lq, D_MODEL, requires_grad=grad)
    value_input = torch.randn(1, s, D_MODEL, requires_grad=grad)
    if role == "encoder":
        ref = deformable.encoder_reference_points(shapes, torch.ones(1, N_LEVELS, 2))
    else:
        ref = torch.rand(1, lq, N_LEVELS, 2)

    def step() -> None:
        with deform_attn_impl(impl):
            if grad:
                attn(query, ref, value_input, shapes).sum().backward()
            else:
                with torch.no_grad():
                    attn(query, ref, value_input, shapes)

    rss_before = rss_bytes()
    walls, cpus = [], []
    for i in range(repeats + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        if i:  # the first call is the warm-up
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"size": size, "role": role, "impl": impl, "mode": mode, "threads": torch.get_num_threads(), "S": s,
            "Lq": lq, "wall_ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus),
            "wall_ms_all": [1e3 * t for t in walls], "peak_extra_mb": (peak - rss_before) / 2 ** 20,
            "load_average": os.getloadavg()}


def run_step_child(impl: str, iters: int) -> dict:
    """Median seconds of one isda_tiny training step (forward, losses, backward, AdamW) under `impl`."""
    import istr
    from istr.ops.deform_attn import deform_attn_impl

    torch.manual_seed(0)
    model = istr.create_model("isda_tiny", num_classes=3, num_queries=20, train_min_sizes=None,
                              detections_per_image=50, min_size=96, max_size=96)  # the demo's settings (istr.demo)
    model.train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g) for _ in range(8)]
    targets = []
    for i in range(8):
        boxes = torch.tensor([[8.0 + i, 10.0, 50.0, 60.0 - i], [40.0, 30.0 + i, 90.0 - i, 88.0]])
        masks = torch.zeros(2, 96, 96, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([i % 3, (i + 1) % 3]), "masks": masks})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, cpu_times, losses = [], [], []
    with deform_attn_impl(impl):
        for i in range(iters + 2):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(images, targets)
            loss = out["loss"] if "loss" in out else sum(v for v in out.values() if v.dim() == 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
            losses.append(float(loss.detach()))
    return {"impl": impl, "median_s": statistics.median(times), "cpu_median_s": statistics.median(cpu_times),
            "times_s": times, "cpu_times_s": cpu_times, "losses": losses,
            "load_average": os.getloadavg()}


def machine() -> dict:
    cpu = platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "load_average_start": os.getloadavg()}


def _fmt_load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Multi-scale deformable attention: one layer on CPU, grid_sample vs gather", "",
             f"{m['cpu']} ({m['cpu_count']} cores, {m['cpu_capability']}), torch {m['torch']}, fp32, batch 1, "
             f"d {D_MODEL}, {N_HEADS} heads, {N_LEVELS} levels, {N_POINTS} points; median of {result['repeats']} "
             "runs after a warm-up, each row in its own process. Load average (1/5/15 min) at start / end: "
             f"{_fmt_load(m['load_average_start'])} / {_fmt_load(result['load_average_end'])}.", ""]
    rows = {(r["size"], r["role"], r["impl"], r["mode"], r["threads"]): r for r in result["rows"]}
    share = statistics.median(r["cpu_ms"] / r["wall_ms"] for r in result["rows"] if r["threads"] == 1)
    lines += [f"A 1-thread row's process got {share:.2f} of a core (median CPU time / wall time over the rows): "
              "where that is well below 1, other jobs held the CPU and the CPU-time columns are the better measure "
              "of each implementation's cost.", ""]
    for threads in result["threads"]:
        lines += [f"## {threads} thread(s)", "",
                  "| input | layer | S | Lq | impl | fwd wall / cpu (ms) | fwd+bwd wall / cpu (ms) | bwd wall (ms) "
                  "| fwd speed-up wall / cpu | fwd+bwd speed-up wall / cpu | peak extra fwd / fwd+bwd (MiB) "
                  "| load at row |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for size, role in CASES:
            base_f = rows[(size, role, "grid_sample", "fwd", threads)]
            base_fb = rows[(size, role, "grid_sample", "fwd+bwd", threads)]
            for impl in IMPLS:
                f, fb = rows[(size, role, impl, "fwd", threads)], rows[(size, role, impl, "fwd+bwd", threads)]
                lines.append(
                    f"| {size} | {role} | {f['S']} | {f['Lq']} | {impl} | {f['wall_ms']:.0f} / {f['cpu_ms']:.0f} | "
                    f"{fb['wall_ms']:.0f} / {fb['cpu_ms']:.0f} | {fb['wall_ms'] - f['wall_ms']:.0f} | "
                    f"{base_f['wall_ms'] / f['wall_ms']:.2f}x / {base_f['cpu_ms'] / f['cpu_ms']:.2f}x | "
                    f"{base_fb['wall_ms'] / fb['wall_ms']:.2f}x / {base_fb['cpu_ms'] / fb['cpu_ms']:.2f}x | "
                    f"{f['peak_extra_mb']:.0f} / {fb['peak_extra_mb']:.0f} | {fb['load_average'][0]:.1f} |")
        lines.append("")
    if result.get("step"):
        lines += ["## isda_tiny training step (1 thread)", "",
                  "istr.create_model(\"isda_tiny\", num_classes=3) with the demo's model settings (20 queries, 96 px), "
                  "AdamW, batch of 8 random 96x96 images with two box-shaped masks each; median of the steps after "
                  "two warm-ups, processes alternating between "
                  "the implementations.", "",
                  "| impl | median step wall / cpu (s), per process | median of the medians, wall / cpu (s) "
                  "| losses vs grid_sample's |", "|---|---|---|---|"]
        by_impl = {impl: [r for r in result["step"] if r["impl"] == impl] for impl in IMPLS}
        ref = by_impl["grid_sample"][0]["losses"]
        for impl, runs in by_impl.items():
            worst = max(abs(a - b) / max(abs(b), 1e-12) for r in runs for a, b in zip(r["losses"], ref))
            medians = ", ".join(f"{r['median_s']:.3f} / {r['cpu_median_s']:.3f}" for r in runs)
            lines.append(f"| {impl} | {medians} | {statistics.median(r['median_s'] for r in runs):.3f} / "
                         f"{statistics.median(r['cpu_median_s'] for r in runs):.3f} | max relative difference "
                         f"{worst:.1e} |")
        lines.append("")
    lines += ["\"fwd\" runs under no_grad, \"fwd+bwd\" backpropagates out.sum() into the query, value input and "
              "parameters, \"bwd\" is the difference of the two wall times; speed-ups are grid_sample's time "
              "over the row's (wall, and process CPU time). The layer includes its four linear projections and "
              "softmax (the same in both rows). "
              "Peak extra is the rise in peak RSS over the RSS before the first call (allocator caching included).",
              "", "Measured on the shared 2-core dev machine with other jobs running (the load column): wall times "
              "are noisy, see the per-run times in the JSON; CPU time is less sensitive to contention."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step", action="store_true", help="also time the isda_tiny training step (1 thread)")
    parser.add_argument("--step-iters", type=int, default=8)
    parser.add_argument("--step-rounds", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--child", nargs=4, metavar=("SIZE", "ROLE", "IMPL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--step-child", metavar="IMPL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads[0])
    if args.child:
        print(json.dumps(run_child(*args.child, repeats=args.repeats)))
        return
    if args.step_child:
        print(json.dumps(run_step_child(args.step_child, args.step_iters)))
        return
    result = {"machine": machine(), "repeats": args.repeats, "threads": args.threads, "rows": [], "step": []}
    print(f"{'input':16} {'layer':8} {'impl':12} {'mode':8} {'thr':>3} {'Lq':>6} {'wall ms':>9} {'cpu ms':>9} "
          f"{'peak MiB':>8} {'load':>5}")
    for threads in args.threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        for size, role in CASES:
            for impl in IMPLS:
                for mode in ("fwd", "fwd+bwd"):
                    cmd = [sys.executable, __file__, "--threads", str(threads), "--repeats", str(args.repeats),
                           "--child", size, role, impl, mode]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    result["rows"].append(row)
                    print(f"{size:16} {role:8} {impl:12} {mode:8} {threads:3d} {row['Lq']:6d} {row['wall_ms']:9.0f} "
                          f"{row['cpu_ms']:9.0f} {row['peak_extra_mb']:8.0f} {row['load_average'][0]:5.1f}",
                          flush=True)
    if args.step:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for _ in range(args.step_rounds):
            for impl in IMPLS:
                cmd = [sys.executable, __file__, "--threads", "1", "--step-iters", str(args.step_iters),
                       "--step-child", impl]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                row = json.loads(out.strip().splitlines()[-1])
                result["step"].append(row)
                print(f"isda_tiny step  {impl:12} median wall {row['median_s']:.3f} s  "
                      f"cpu {row['cpu_median_s']:.3f} s  "
                      f"load {row['load_average'][0]:.1f}", flush=True)
    result["load_average_end"] = os.getloadavg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "deform_attn_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "deform_attn_cpu.md").write_text(markdown(result))
    print(f"wrote {args.out_dir / 'deform_attn_cpu.json'} and {args.out_dir / 'deform_attn_cpu.md'}")


if __name__ == "__main__":
    main()
