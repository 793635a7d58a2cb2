"""Data: COCO-format instance dataset, joint image/box/mask transforms, synthetic shapes dataset."""
from istr.data.coco import (CocoInstances, collate_fn, describe_stats, image_tensor, load_coco_json,
                            load_image, pil_to_tensor, read_coco_annotations)
from istr.data.results import validate_coco_results
from istr.data.synthetic import SHAPE_CLASSES, make_synthetic_coco
from istr.data.transforms import Compose, RandomRelativeCrop, boxes_from_masks, build_transforms

__all__ = [
    "SHAPE_CLASSES",
    "CocoInstances",
    "Compose",
    "RandomRelativeCrop",
    "boxes_from_masks",
    "build_transforms",
    "collate_fn",
    "image_tensor",
    "describe_stats",
    "load_coco_json",
    "load_image",
    "make_synthetic_coco",
    "pil_to_tensor",
    "read_coco_annotations",
    "validate_coco_results",
]
