"""Distributed training: 2 CPU processes (gloo, launched by torchrun) give the gradients of 1 process, same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_utils import grads_after_one_step, make_data

HERE = Path(__file__).resolve().parents[1]  # tests/, where train_utils.py lives


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_process_gradients_equal_one_process(tmp_path):
    data = make_data(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    # torchrun --standalone: env:// rendezvous on a free localhost port; 2 ranks x 2 images
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "train_utils.py"), data["root"], str(tmp_path / "ddp.pt"), "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # the same global batch of 4 images in this process alone
    grads_after_one_step(data["root"], str(tmp_path / "single.pt"), 4)

    ddp, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert set(ddp["grads"]) == set(single["grads"]) and len(single["grads"]) > 50
    nonzero = 0
    for name, g in single["grads"].items():
        # float32 sums in a different order: allow 1e-4 of the tensor's largest gradient
        scale = float(g.abs().max())
        assert torch.allclose(ddp["grads"][name], g, rtol=1e-3, atol=1e-4 * scale + 1e-9), \
            f"{name}: max abs diff {float((ddp['grads'][name] - g).abs().max()):.3g}, max |g| {scale:.3g}"
        nonzero += int(g.abs().sum() > 0)
    assert nonzero > 0.8 * len(single["grads"])  # the comparison is not vacuous
    # the logged loss is the all-reduced mean, i.e. the single-process loss of the whole batch
    assert abs(ddp["loss"] - single["loss"]) < 1e-4 * max(1.0, abs(single["loss"]))
