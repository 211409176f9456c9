"""Training, evaluation, re-parameterization and export of the registry models.

The CLI commands `falconnet train | eval | reparam | export` live in cli_*.py; the pieces:
data.py (datasets as uint8 tensors), augment.py (batched crop/flip/resize on any device),
recipe.py (the paper's recipe), trainer.py (the loop, DDP, checkpoints), checkpoint.py (atomic
files, RNG state), deploy.py (re-parameterize and check), export.py (ONNX, TorchScript).
"""
from .recipe import PAPER_RECIPE, TrainConfig
from .trainer import TrainError, TrainResult, evaluate, train

__all__ = ["PAPER_RECIPE", "TrainConfig", "TrainError", "TrainResult", "evaluate", "train"]
