"""Engine: training (config, loop, hooks, run folder), COCO evaluation and inference, checkpoints, distributed."""
from istr.engine.evaluate import METRIC_NAMES, coco_evaluate, evaluate, results_to_coco
from istr.engine.predict import predict

__all__ = ["METRIC_NAMES", "coco_evaluate", "evaluate", "predict", "results_to_coco"]

# training (appended by the training helper)
from istr.engine.checkpoint import CheckpointMismatchError, latest_checkpoint, load_checkpoint, save_checkpoint
from istr.engine.fit_codec import coco_mask_grids, fit_codec_on_coco
from istr.engine.train import NonFiniteLossError, TrainConfig, Trainer, TrainResult, train

__all__ += ["CheckpointMismatchError", "NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "coco_mask_grids",
            "fit_codec_on_coco", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "train"]

from istr.engine.config import LIBRARY_DEFAULTS, RECIPE_FIELDS, resolve_config
from istr.engine.rundir import RunDir, RunLockedError

__all__ += ["LIBRARY_DEFAULTS", "RECIPE_FIELDS", "RunDir", "RunLockedError", "resolve_config"]
