"""ISTR: K learnable query boxes refined over N stages; mask embeddings decoded by a fixed codec (NMS-free)."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.ops import box_convert

from istr.codecs import MaskCodec, NotFittedError, create_codec
from istr.io import register_architecture
from istr.models.base import DetectionModel, check_backbone, check_positive_ints, topk_over_classes
from istr.models.istr.head import ISTRStage
from istr.models.istr.results import paste_results
from istr.models.istr.targets import box_targets
from istr.models.transform import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from istr.ops.roi_align import PyramidTable

__all__ = ["ISTR", "DEFAULT_TRAIN_MIN_SIZES"]

DEFAULT_TRAIN_MIN_SIZES = tuple(range(480, 801, 32))  # paper / v1: short side 480..800 step 32


@register_architecture("istr")
class ISTR(DetectionModel):
    """Instance Segmentation TRansformer (paper = reference v1 by default; v2 options behind arguments).

    model(images, targets=None, all_stages=False), images: list of float [3, H, W] in [0, 1], any sizes.
    - train mode: targets = list of {"boxes": float [N, 4] absolute xyxy (original pixels), "labels": int64 [N]
      in [0, num_classes), "masks": uint8 [N, H, W]} -> the criterion's dict of scalar losses (incl. "loss").
    - eval mode: list of {"boxes": [N, 4] xyxy original pixels, "labels": int64 [N], "scores": [N],
      "masks": float [N, 1, H, W] in [0, 1]}, N <= detections_per_image; with all_stages=True a list over
      stages of such lists, from one forward.

    In eval mode images are batched only with images of the same padded size (ImageTransform.same_size_groups),
    so an image's result does not depend on the other images of the batch (it is the result it gets alone).

    Modules are injected: `backbone` (maps [B, 3, H, W] to 4 maps of `hidden_dim` channels at strides 4..32,
    e.g. istr.models.Backbone), `codec` (a MaskCodec; may still be unfitted at construction, it is checked at
    forward), `criterion` (called as criterion(stage_outputs, targets, codec); needed only for training).

    Table 1 ablations: `attention` "dynamic" | "multihead" (1d), `image_pool` "avg" | "max" | None and
    `position_embedding` (1e), any codec incl. identity l=784 (1a). The image pool covers each image's own
    region of the padded batch, so results do not depend on batch composition; `image_pool_padding=True`
    pools the whole padded map as the authors' code does (their results change with the batch's other images). v2 options: `mask_head="roi_conv"`
    (28x28 RoIAlign at the new boxes + conv head), `stage_logit_average` (inference logits averaged over
    stages 2..N-1).

    Mask targets are soft RoIAlign crops of the full-resolution GT masks by default; target_crop="polygon" takes
    the authors' binary crop, the COCO polygons rasterised straight into the M x M grid (targets need
    "segmentations": CocoInstances(..., segmentations=True)); thresholded, the two differ in 2.9% of grid pixels
    on real COCO masks.

    Denoising training (off by default; not in the paper): `denoising_groups` G > 0 adds, in training only,
    G jittered copies of every ground-truth box as extra queries (DN-DETR's box noise: centre shifted by up to
    `denoising_box_noise` x half the width/height, width/height scaled by 1 +- that). They run through the
    same stages in a separate pass (self-attention within each copy only), each supervised by the box it came
    from, with no matching: the head gets direct class, box and mask-embedding targets from the first step
    (DiffusionDet trains this head on noised boxes alone). Inference is unchanged.
    """

    def __init__(self, backbone: nn.Module, codec: MaskCodec, num_classes: int = 80, *,
                 criterion: nn.Module | None = None, num_queries: int = 300, num_stages: int = 6,
                 hidden_dim: int = 256, dynamic_dim: int = 64, ffn_dim: int = 2048, num_heads: int = 8,
                 roi_size: int = 7, attention: str = "dynamic", image_pool: str | None = "avg",
                 image_pool_padding: bool = False, position_embedding: bool = True, mask_head: str = "query_mlp", mask_roi_size: int = 28,
                 mask_dim: int | None = None, stage_logit_average: bool = False, logit_average_from: int = 2,
                 detections_per_image: int = 100, mask_threshold: float | None = None, prior_prob: float = 0.01,
                 denoising_groups: int = 0, denoising_box_noise: float = 0.4, target_crop: str = "roi_align",
                 min_size: int = 800, max_size: int = 1333,
                 train_min_sizes: Sequence[int] | None = DEFAULT_TRAIN_MIN_SIZES, size_divisible: int = 32,
                 pixel_mean: Sequence[float] = IMAGENET_MEAN, pixel_std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if not isinstance(codec, MaskCodec):
            raise TypeError(f"codec must be an istr MaskCodec (istr.create_codec(...)), got {type(codec).__name__}")
        if mask_dim is not None and mask_dim != codec.dim:
            raise ValueError(f"the mask head outputs mask_dim={mask_dim} but the codec embeds masks in "
                             f"l={codec.dim} dims ({type(codec).__name__}); they must agree")
        check_positive_ints(num_classes=num_classes, num_queries=num_queries, num_stages=num_stages,
                            hidden_dim=hidden_dim, detections_per_image=detections_per_image)
        if not isinstance(denoising_groups, int) or isinstance(denoising_groups, bool) or denoising_groups < 0:
            raise ValueError(f"denoising_groups must be an int >= 0, got {denoising_groups!r}")
        if not isinstance(denoising_box_noise, (int, float)) or not 0 < denoising_box_noise < 2:
            raise ValueError(f"denoising_box_noise must be in (0, 2) (a fraction of the box size), "
                             f"got {denoising_box_noise!r}")
        if target_crop not in ("roi_align", "polygon"):
            raise ValueError(f"target_crop must be 'roi_align' or 'polygon', got {target_crop!r}")
        if image_pool not in ("avg", "max", None):
            raise ValueError(f"image_pool must be 'avg', 'max' or None, got {image_pool!r}")
        if image_pool is None and not position_embedding:
            raise ValueError("image_pool=None with position_embedding=False leaves the initial queries all zero")
        self.strides = check_backbone(backbone, hidden_dim)  # RoI tokens and queries have the backbone's width
        self.backbone, self.codec, self.criterion = backbone, codec, criterion
        self.num_classes, self.num_queries, self.num_stages = num_classes, num_queries, num_stages
        self.image_pool, self.image_pool_padding = image_pool, bool(image_pool_padding)
        self.detections_per_image, self.target_crop = detections_per_image, target_crop
        self.stage_logit_average, self.logit_average_from = bool(stage_logit_average), int(logit_average_from)
        self.mask_threshold = mask_threshold
        self.transform = ImageTransform(min_size, max_size, train_min_sizes, size_divisible, pixel_mean, pixel_std)
        self.hidden_dim = hidden_dim

        # position embeddings: N(0, 1) (nn.Embedding's default); query boxes: normalised cxcywh = whole image
        self.position_embeddings = nn.Parameter(torch.randn(num_queries, hidden_dim)) if position_embedding else None
        self.query_boxes = nn.Parameter(torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(num_queries, 1))
        self.denoising_groups, self.denoising_box_noise = denoising_groups, float(denoising_box_noise)
        # the denoising queries' shared initial feature (their boxes say where they are)
        self.denoising_query = nn.Parameter(torch.randn(hidden_dim)) if denoising_groups else None
        stage = ISTRStage(num_classes, codec.dim, hidden_dim=hidden_dim, dynamic_dim=dynamic_dim, ffn_dim=ffn_dim,
                          num_heads=num_heads, roi_size=roi_size, attention=attention, mask_head=mask_head,
                          mask_roi_size=mask_roi_size, strides=self.strides, prior_prob=prior_prob)
        # deep copies, then Xavier re-init per stage (reference sec. 1.4): independent weights per stage
        self.stages = nn.ModuleList([stage] + [copy.deepcopy(stage) for _ in range(num_stages - 1)])
        for s in self.stages[1:]:
            s.reset_parameters()

    # ------------------------------------------------------------------ construction info
    module_args = ("backbone", "codec", "criterion")
    export_head_class = "istr.models.istr.export:ISTRExportHead"  # istr.export's tensor-in / tensor-out graph
    # construction keys that may differ when loading weights into an existing model (no effect on the weights)
    inference_options = DetectionModel.inference_options | {"stage_logit_average", "logit_average_from",
                                                            "image_pool_padding", "target_crop"}

    def _module_config(self, name: str, module: Any) -> Any:
        if name == "codec":
            return {"name": module.codec_name, "config": module.config()}
        return super()._module_config(name, module)

    @classmethod
    def _build_module(cls, name: str, module_config: Any, config: dict[str, Any]) -> Any:
        if name == "codec":
            return create_codec(module_config["name"], **module_config["config"])
        return super()._build_module(name, module_config, config)

    def prepare_training(self, annotation_file: Any, max_masks: int | None = None) -> str | None:
        """Fit the codec on the box-cropped masks of a COCO annotation file when it is not fitted yet."""
        if self.codec.is_fitted:
            return None
        from istr.data.coco import describe_stats
        from istr.data.grids import coco_mask_grids

        grids, stats = coco_mask_grids(annotation_file, self.codec.mask_size, max_masks=max_masks, return_stats=True)
        self.codec.fit(grids)
        return f"fitted the {type(self.codec).__name__} on {len(grids)} training masks ({describe_stats(stats)})"

    def train(self, mode: bool = True) -> "ISTR":
        """The codec is pre-learned and fixed (paper): it stays in eval mode whatever the model's mode."""
        super().train(mode)
        self.codec.eval()
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of everything but the backbone (incl. FPN) and the codec: queries + stages."""
        skip = {id(p) for p in self.backbone.parameters()} | {id(p) for p in self.codec.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    # ------------------------------------------------------------------ forward
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None,
                all_stages: bool = False) -> Any:
        self._check_codec()
        images, original_sizes = self.check_call(images, targets, all_stages, self.query_boxes.device)
        if not self.training:  # images of other padded sizes run apart: each result is the image's alone
            return self.grouped_inference(self._infer, images, all_stages)
        batch, sizes = self.transform(images)
        features, table = self._features(batch)
        prepared = box_targets(targets, original_sizes, sizes, self.codec.mask_size, self.query_boxes.device,
                               self.target_crop)
        denoising = self._denoising_queries(features, sizes, prepared) if self.denoising_groups else None
        stage_outputs, dn_outputs = self._run_stages(features, table, sizes, True, denoising)
        keys = ("logits", "boxes", "mask_embeds")
        strip = lambda outputs: [{k: o[k] for k in keys} for o in outputs]  # noqa: E731
        extra = {} if denoising is None else {"denoising": (strip(dn_outputs), denoising[2])}
        return self.criterion(strip(stage_outputs), prepared, {"codec": self.codec}, **extra)

    def _features(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], PyramidTable]:
        features = self.backbone(batch)
        if len(features) != len(self.strides):
            raise ValueError(f"the backbone returned {len(features)} feature maps, expected {len(self.strides)}")
        return features, PyramidTable(features, self.strides)  # the RoIAlign source of every stage, built once

    def _infer(self, images: list[torch.Tensor], all_stages: bool) -> Any:
        """Results of images padded alike (see ImageTransform.same_size_groups)."""
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, sizes = self.transform(images)
        features, table = self._features(batch)
        stage_outputs, _ = self._run_stages(features, table, sizes, with_masks=False)
        stage_ids = range(self.num_stages) if all_stages else [self.num_stages - 1]
        results = [paste_results(self._detections(stage_outputs, s, table), sizes, original_sizes, self.mask_threshold)
                   for s in stage_ids]
        return results if all_stages else results[0]

    def _pooled(self, features: list[torch.Tensor], sizes: list[tuple[int, int]]) -> torch.Tensor | None:
        """The image-pool part of the initial queries [B, d]: average (or max) per level, summed over levels (not
        averaged), over each image's own region of the map (ceil(h / stride) x ceil(w / stride)), or over the
        whole padded map with image_pool_padding."""
        if self.image_pool is None:
            return None
        pooled = None
        for f, stride in zip(features, self.strides):
            if self.image_pool_padding or all(-(-h // stride) == f.shape[2] and -(-w // stride) == f.shape[3]
                                              for h, w in sizes):
                p = f.mean((2, 3)) if self.image_pool == "avg" else f.amax((2, 3))
            else:
                rows = torch.arange(f.shape[2], device=f.device)
                cols = torch.arange(f.shape[3], device=f.device)
                limits = torch.tensor([[-(-h // stride), -(-w // stride)] for h, w in sizes], device=f.device)
                valid = (rows[None, :, None] < limits[:, 0, None, None]) & (cols[None, None, :] < limits[:, 1, None, None])
                valid = valid[:, None].to(f.dtype)  # [B, 1, H_l, W_l]
                if self.image_pool == "avg":
                    p = (f * valid).sum((2, 3)) / valid.sum((2, 3))
                else:
                    p = f.masked_fill(valid == 0, float("-inf")).amax((2, 3))
            pooled = p if pooled is None else pooled + p
        return pooled

    def _initial_queries(self, features: list[torch.Tensor], sizes: list[tuple[int, int]]) -> torch.Tensor:
        b = features[0].shape[0]
        queries = features[0].new_zeros((b, self.num_queries, self.hidden_dim))
        pooled = self._pooled(features, sizes)
        if pooled is not None:
            queries = queries + pooled[:, None, :]
        if self.position_embeddings is not None:
            queries = queries + self.position_embeddings[None]
        return queries

    def _run_stages(self, features: list[torch.Tensor], table: PyramidTable, sizes: list[tuple[int, int]],
                    with_masks: bool, denoising: tuple[torch.Tensor, torch.Tensor, list] | None = None) -> Any:
        """Stage outputs: list of {"logits" [B,K,C], "boxes" [B,K,4] xyxy (resized input), "queries" [B,K,d]}
        plus "mask_embeds" [B,K,l] when with_masks.

        denoising: (boxes [B, D, 4], queries [B, D, d], assignment) of denoising queries (_denoising_queries).
        They run in the same pass, after the K learned queries, under a block-diagonal self-attention mask (the
        learned queries and each jittered copy attend only within themselves; DN-DETR's single pass), so the
        learned queries' outputs are those of a pass without them. Returns (outputs, denoising outputs or None).
        """
        wh = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=features[0].dtype, device=features[0].device)
        boxes = box_convert(self.query_boxes, "cxcywh", "xyxy")[None] * wh[:, None, :]  # [B, K, 4]
        queries, attn_mask, k = self._initial_queries(features, sizes), None, self.num_queries
        if denoising is not None:
            dn_boxes, dn_queries = denoising[:2]
            boxes, queries = torch.cat([boxes, dn_boxes], 1), torch.cat([queries, dn_queries], 1)
            t_max = dn_boxes.shape[1] // self.denoising_groups
            block = torch.cat([torch.zeros(k, dtype=torch.long), 1 + torch.arange(dn_boxes.shape[1]) // t_max])
            attn_mask = (block[:, None] != block[None, :]).to(boxes.device)
        outputs = []
        for stage in self.stages:
            queries, logits, new_boxes = stage(table, boxes, queries, attn_mask)
            out = {"logits": logits, "boxes": new_boxes, "queries": queries}
            if with_masks:
                out["mask_embeds"] = stage.mask_embeds(queries, new_boxes, table)
            outputs.append(out)
            boxes = new_boxes.detach()  # boxes are detached between stages; query features are not
        if denoising is None:
            return outputs, None
        split = lambda part: [{key: v[:, part] for key, v in o.items()} for o in outputs]  # noqa: E731
        return split(slice(0, k)), split(slice(k, None))

    def _denoising_queries(self, features: list[torch.Tensor], sizes: list[tuple[int, int]],
                           targets: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list] | None:
        """G jittered copies of each image's GT boxes as extra queries -> (boxes [B, G*T, 4], initial query
        features [B, G*T, d], fixed assignment as (query index, target index) pairs per image, query index
        counted from the first denoising query), or None for a batch without boxes.

        Images with fewer boxes than the batch's most (T) are padded with whole-image boxes, which are supervised
        as background. Copy g of image b occupies denoising queries [g*T, (g+1)*T)."""
        groups, counts = self.denoising_groups, [len(t["labels"]) for t in targets]
        t_max = max(counts)
        if t_max == 0:
            return None
        device, dtype = features[0].device, features[0].dtype
        boxes = torch.zeros((len(targets), groups, t_max, 4), device=device, dtype=torch.float32)
        indices = []
        for b, (t, n, (h, w)) in enumerate(zip(targets, counts, sizes)):
            boxes[b] = torch.tensor([0.0, 0.0, w, h], device=device)
            if n:
                boxes[b, :, :n] = self._jitter(t["boxes"].float().repeat(groups, 1), h, w).view(groups, n, 4)
            src = (torch.arange(groups)[:, None] * t_max + torch.arange(n)[None]).flatten()
            indices.append((src, torch.arange(n).repeat(groups)))
        boxes = boxes.view(len(targets), groups * t_max, 4).to(dtype)
        pooled = self._pooled(features, sizes)
        queries = self.denoising_query[None, None].expand(len(targets), groups * t_max, -1)
        if pooled is not None:
            queries = queries + pooled[:, None, :]
        return boxes, queries, indices

    def _jitter(self, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """DN-DETR box noise on xyxy boxes, then clipped to the image (at least 1 px wide and high)."""
        cxcywh = box_convert(boxes, "xyxy", "cxcywh")
        noise = (torch.rand_like(cxcywh) * 2 - 1) * self.denoising_box_noise
        cx, cy, bw, bh = cxcywh.unbind(1)
        cxcywh = torch.stack([cx + noise[:, 0] * bw / 2, cy + noise[:, 1] * bh / 2,
                              bw * (1 + noise[:, 2]), bh * (1 + noise[:, 3])], 1)
        x0, y0, x1, y1 = box_convert(cxcywh, "cxcywh", "xyxy").unbind(1)
        x0, y0 = x0.clamp(0, w - 1), y0.clamp(0, h - 1)
        return torch.stack([x0, y0, torch.maximum(x1.clamp(max=w), x0 + 1), torch.maximum(y1.clamp(max=h), y0 + 1)], 1)

    # ------------------------------------------------------------------ inference
    def _detections(self, stage_outputs: list[dict[str, torch.Tensor]], stage_id: int,
                    table: PyramidTable) -> list[dict[str, torch.Tensor]]:
        """Top detections of one stage on the resized input: per image {"boxes" [N, 4], "labels", "scores",
        "mask_grids" [N, M, M]} (paste_results maps them to the original images)."""
        out = stage_outputs[stage_id]
        logits = out["logits"]
        if self.stage_logit_average and stage_id == self.num_stages - 1:
            first = min(self.logit_average_from, self.num_stages - 1)
            logits = torch.stack([o["logits"] for o in stage_outputs[first:]]).mean(0)
        scores, labels, query = topk_over_classes(logits, self.detections_per_image)
        b, top = scores.shape
        gather = lambda x: torch.gather(x, 1, query[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        boxes, queries = gather(out["boxes"]), gather(out["queries"])
        # only the kept detections run the mask branch (duplicated queries are cheap: at most `top` rows)
        embeds = self.stages[stage_id].mask_embeds(queries, boxes, table)
        grids = self.codec.decode(embeds.reshape(b * top, -1).float()).view(b, top, *([self.codec.mask_size] * 2))
        return [{"boxes": boxes[i], "labels": labels[i], "scores": scores[i], "mask_grids": grids[i]} for i in range(b)]

    def _check_codec(self) -> None:
        if not self.codec.is_fitted:
            raise NotFittedError(f"the model's {type(self.codec).__name__} is not fitted: fit it on box-cropped GT "
                                 "mask grids (model.codec.fit(grids)), or build the model with a fitted codec "
                                 "(istr.create_model(name, codec=istr.load_codec(path)))")
        branch = self.stages[0].mask_branch
        out_dim = branch[-1].out_features if isinstance(branch, nn.Sequential) else branch.convs[-1].out_channels
        if out_dim != self.codec.dim:  # e.g. model.codec replaced after construction
            raise ValueError(f"the mask head outputs {out_dim}-d embeddings but the codec has dim {self.codec.dim}")
