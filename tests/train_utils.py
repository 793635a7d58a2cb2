"""Helpers for the training/CLI/distributed tests: a tiny synthetic dataset, a tiny ISTR, and a torchrun worker.

Run as a script under torchrun it is the worker of tests/engine/test_distributed.py:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_utils.py DATA_ROOT OUT_FILE BATCH
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

# small enough that one training step takes well under a second on one CPU thread
TINY_MODEL = dict(num_queries=6, num_stages=2, hidden_dim=32, dynamic_dim=8, ffn_dim=64, num_heads=2,
                  detections_per_image=12, min_size=64, max_size=64, train_min_sizes=(48, 64))
TINY_CODEC = dict(mask_size=14, dim=8)


def make_data(root: Path, num_train: int = 8, num_val: int = 4, size: int = 64) -> dict[str, str]:
    """A small synthetic COCO dataset (istr.data.make_synthetic_coco) written under root (reused if present)."""
    from istr.data import make_synthetic_coco

    root = Path(root)
    paths = {"root": str(root), "train_images": str(root / "train"),
             "train_annotations": str(root / "annotations" / "instances_train.json"),
             "val_images": str(root / "val"), "val_annotations": str(root / "annotations" / "instances_val.json")}
    if not Path(paths["val_annotations"]).is_file():
        paths = make_synthetic_coco(root, num_train=num_train, num_val=num_val, image_size=size, seed=0,
                                    min_objects=1, max_objects=3)
    return paths


def fitted_codec(ann_file: str):
    from istr.engine.fit_codec import fit_codec_on_coco

    return fit_codec_on_coco("pca", ann_file, **TINY_CODEC)


def tiny_model(ann_file: str, seed: int = 0, **overrides):
    """istr_tiny shrunk for tests (8 synthetic classes), with a PCA codec fitted on ann_file's masks."""
    import istr

    torch.manual_seed(seed)
    return istr.create_model("istr_tiny", num_classes=8, codec=fitted_codec(ann_file), **{**TINY_MODEL, **overrides})


def datasets(paths: dict[str, str], flip: bool = False):
    from istr.data import CocoInstances, build_transforms

    transforms = build_transforms(True, crop_prob=0.0) if flip else None
    train = CocoInstances(paths["train_images"], paths["train_annotations"], transforms=transforms)
    val = CocoInstances(paths["val_images"], paths["val_annotations"], include_empty=True)
    return train, val


def grads_after_one_step(data_root: str, out_file: str, batch_size: int) -> None:
    """Train one step (global batch = batch_size x world size) and save rank 0's gradients to out_file."""
    from istr.engine.distributed import cleanup_distributed
    from istr.engine.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    paths = make_data(Path(data_root))
    train, _ = datasets(paths)
    # frozen BN and one input size: the only differences left between 1 x 2B and 2 x B are the reductions
    model = tiny_model(paths["train_annotations"], frozen_bn=True, train_min_sizes=None)
    cfg = TrainConfig(lr=1e-3, batch_size=batch_size, max_iters=1, warmup_iters=0, checkpoint_every=0,
                      clip_grad_norm=0, progress=False, device="cpu", seed=3)
    trainer = Trainer(model, train, cfg, out_dir=str(Path(out_file).parent / f"run_{Path(out_file).stem}"))
    losses = trainer.train_step()
    if trainer.is_main:
        grads = {n: p.grad.detach().clone() for n, p in trainer.module.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "loss": losses["loss"], "world_size": trainer.dist.world_size}, out_file)
    cleanup_distributed()


if __name__ == "__main__":
    grads_after_one_step(sys.argv[1], sys.argv[2], int(sys.argv[3]))
