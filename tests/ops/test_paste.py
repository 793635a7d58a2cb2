"""paste_masks (separable bilinear) against an independent F.grid_sample reference."""
import math

import torch
import torch.nn.functional as F

from istr.ops import paste_masks


def grid_sample_paste(grids, boxes, size):
    """Reference: grid_sample (bilinear, zeros, align_corners=False) on each box's pixels, +-1 px margin."""
    h, w = size
    out = torch.zeros(len(grids), h, w)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        px0, px1 = max(math.floor(x0) - 1, 0), min(math.ceil(x1) + 1, w)
        py0, py1 = max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, h)
        if px1 <= px0 or py1 <= py0:
            continue
        xs = (torch.arange(px0, px1) + 0.5 - x0) / (x1 - x0) * 2 - 1
        ys = (torch.arange(py0, py1) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]
        out[i, py0:py1, px0:px1] = F.grid_sample(grids[i][None, None], grid, align_corners=False)[0, 0]
    return out


def test_paste_equals_grid_sample():
    torch.manual_seed(0)
    grids = torch.rand(12, 28, 28)
    xy = torch.rand(12, 2) * 150
    boxes = torch.cat([xy, xy + torch.rand(12, 2) * 120 + 0.3], 1)
    boxes[0] = torch.tensor([-10.0, -5.0, 50.0, 400.0])  # partly outside the image
    boxes[1] = torch.tensor([100.5, 20.25, 101.0, 21.0])  # sub-pixel box
    ours = paste_masks(grids, boxes, (200, 260))
    assert torch.allclose(ours, grid_sample_paste(grids, boxes, (200, 260)), atol=1e-5)


def test_paste_threshold_and_empty_boxes():
    grids = torch.ones(3, 8, 8)
    boxes = torch.tensor([[10.0, 10.0, 20.0, 30.0], [5.0, 5.0, 5.0, 9.0], [300.0, 300.0, 310.0, 310.0]])
    out = paste_masks(grids, boxes, (40, 40), threshold=0.5)
    assert out.dtype == torch.bool
    assert out[0, 10:30, 10:20].all() and out[0].sum() == 20 * 10 + 0  # inside filled, nothing beyond the fade
    assert not out[1].any() and not out[2].any()  # zero-width box; box outside the image
