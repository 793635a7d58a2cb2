"""Cost of one multi-scale deformable attention layer on CPU: time (forward, forward+backward) and peak memory.

One MultiScaleDeformableAttention (d 256, 8 heads, 4 levels, 4 points, batch 1, fp32) at two input sizes:
  paper  800 x 1333 padded: levels P3..P6 of 100x167, 50x84, 25x42, 13x21 (S = 22223)
  cpu    256 x 256:         levels 32x32, 16x16, 8x8, 4x4 (S = 1360)
as an encoder layer (queries = all S positions, reference points = pixel centres) and as decoder cross-attention
(300 queries, random reference points). "fwd" runs under no_grad; "fwd+bwd" backpropagates out.sum() into the
query, the value input and the parameters. Times are medians over --repeats after one warm-up, wall clock and
process CPU time. Peak extra memory is the rise of the process's peak RSS (ru_maxrss) over its RSS just before the
first call; each (case, mode) runs in its own subprocess so that each high-water mark is its own.
"big intermediate" is N*M*D*Lq*L*P fp32 values, the sampled tensor that backward keeps.
The encoder rows are also run with the core written as in the reference description (levels stacked into one
[N*M, D, Lq, L*P] tensor, multiplied by the weights, summed) to show what istr's level-by-level einsum saves.

  python benchmarks/deform_attn.py --threads 1
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
import torch.nn.functional as F

SIZES = {"paper 800x1333": [(100, 167), (50, 84), (25, 42), (13, 21)],
         "cpu 256x256": [(32, 32), (16, 16), (8, 8), (4, 4)]}
D_MODEL, N_HEADS, N_LEVELS, N_POINTS, N_QUERIES = 256, 8, 4, 4, 300
CASES = [(size, role, core) for size in SIZES for role, core in
         (("encoder", "istr"), ("encoder", "stacked"), ("decoder", "istr"))]


def stacked_core(value, spatial_shapes, sampling_locations, attention_weights):
    """The reference description's core (sec. 2.2 of the notes): all levels stacked, then multiply and sum."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, p, _ = sampling_locations.shape
    value_levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(spatial_shapes):
        value_l = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * p)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(size: str, role: str, core: str, mode: str, repeats: int) -> dict:
    import istr.models.deformable as deformable

    if core == "stacked":
        deformable.ms_deform_attn = stacked_core
    torch.manual_seed(0)
    shapes = SIZES[size]
    s = sum(h * w for h, w in shapes)
    attn = deformable.MultiScaleDeformableAttention(D_MODEL, N_LEVELS, N_HEADS, N_POINTS)
    lq = s if role == "encoder" else N_QUERIES
    grad = mode == "fwd+bwd"
    query = torch.randn(1, lq, D_MODEL, requires_grad=grad)
    value_input = torch.randn(1, s, D_MODEL, requires_grad=grad)
    if role == "encoder":
        ref = deformable.encoder_reference_points(shapes, torch.ones(1, N_LEVELS, 2))
    else:
        ref = torch.rand(1, lq, N_LEVELS, 2)

    def step() -> None:
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
    return {"size": size, "role": role, "core": core, "mode": mode, "S": s, "Lq": lq,
            "wall_ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus),
            "wall_ms_all": [1e3 * t for t in walls], "peak_extra_mb": (peak - rss_before) / 2 ** 20,
            "big_intermediate_mb": 1 * D_MODEL * lq * N_LEVELS * N_POINTS * 4 / 2 ** 20}


def machine(threads: int) -> dict:
    cpu = platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "load_average_start": os.getloadavg()}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Multi-scale deformable attention: one layer on CPU", "",
             f"{m['cpu']} ({m['cpu_count']} cores), {m['threads']} thread(s), torch {m['torch']}, fp32, batch 1, "
             f"d {D_MODEL}, {N_HEADS} heads, {N_LEVELS} levels, {N_POINTS} points; median of {result['repeats']} "
             "runs after a warm-up. Load average at start / end: "
             f"{'/'.join(f'{x:.1f}' for x in m['load_average_start'])} / "
             f"{'/'.join(f'{x:.1f}' for x in result['load_average_end'])}.", "",
             "| input | layer | core | S | Lq | fwd wall / cpu (ms) | fwd+bwd wall / cpu (ms) | peak extra fwd (MiB) "
             "| peak extra fwd+bwd (MiB) | big intermediate (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = {(r["size"], r["role"], r["core"], r["mode"]): r for r in result["rows"]}
    for size, role, core in CASES:
        f, fb = rows[(size, role, core, "fwd")], rows[(size, role, core, "fwd+bwd")]
        lines.append(f"| {size} | {role} | {core} | {f['S']} | {f['Lq']} | {f['wall_ms']:.0f} / {f['cpu_ms']:.0f} | "
                     f"{fb['wall_ms']:.0f} / {fb['cpu_ms']:.0f} | {f['peak_extra_mb']:.0f} | "
                     f"{fb['peak_extra_mb']:.0f} | {f['big_intermediate_mb']:.1f} |")
    lines += ["", "core \"istr\" is istr.ops.ms_deform_attn (one level at a time, weighted by einsum); \"stacked\" is "
              "the reference description's formulation (levels stacked, multiply, sum), written in this script. "
              "Peak extra is the rise in peak RSS over the RSS before the first call, in a fresh process per row "
              "and mode (allocator caching included). Big intermediate: N*M*D*Lq*L*P fp32 values.", "",
              "Measured on the shared 2-core dev machine with other jobs running: timings are noisy (compare the "
              "per-run wall times in the JSON); the CPU-time column is less sensitive to contention than wall time."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--child", nargs=4, metavar=("SIZE", "ROLE", "CORE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(*args.child, repeats=args.repeats)))
        return
    result = {"machine": machine(args.threads), "repeats": args.repeats, "rows": []}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"{'input':16} {'layer':8} {'core':8} {'mode':8} {'Lq':>6} {'wall ms':>9} {'cpu ms':>9} "
          f"{'peak MiB':>8} {'big MiB':>8}")
    for size, role, core in CASES:
        for mode in ("fwd", "fwd+bwd"):
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--child", size, role, core, mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            row = json.loads(out.strip().splitlines()[-1])
            result["rows"].append(row)
            print(f"{size:16} {role:8} {core:8} {mode:8} {row['Lq']:6d} {row['wall_ms']:9.0f} {row['cpu_ms']:9.0f} "
                  f"{row['peak_extra_mb']:8.0f} {row['big_intermediate_mb']:8.1f}", flush=True)
    result["load_average_end"] = os.getloadavg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "deform_attn_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "deform_attn_cpu.md").write_text(markdown(result))
    print(f"wrote {args.out_dir / 'deform_attn_cpu.json'} and {args.out_dir / 'deform_attn_cpu.md'}")


if __name__ == "__main__":
    main()
