"""Engine: COCO evaluation and inference helpers (training: istr.engine.train, checkpoints, distributed)."""
from istr.engine.evaluate import METRIC_NAMES, coco_evaluate, evaluate, results_to_coco
from istr.engine.predict import predict

__all__ = ["METRIC_NAMES", "coco_evaluate", "evaluate", "predict", "results_to_coco"]
