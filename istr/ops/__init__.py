"""Pure tensor functions shared by codecs, models and benchmarks."""
from istr.ops.masks import crop_masks, crop_polygons, paste_masks, rasterize

__all__ = ["crop_masks", "crop_polygons", "paste_masks", "rasterize"]
