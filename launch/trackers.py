"""Where training's numbers go besides the console and metrics.jsonl: train.log_with, through Accelerate's
trackers.

    none         metrics.jsonl only (always written)
    tensorboard  RUN_DIR/tracking/gpt/: event files (pip install tensorboard); `tensorboard --logdir RUN_DIR/tracking`
    wandb        Weights & Biases (pip install wandb; WANDB_MODE=offline keeps the run on disk, `wandb sync` later)
    mlflow       MLflow (pip install mlflow); a local store in RUN_DIR/tracking unless MLFLOW_TRACKING_URI says
    csv          RUN_DIR/tracking/metrics.csv: step, name, value, one row per number (no extra package)

Each gets the run's config once, then per log line: train/loss, lr, tokens_per_s, mfu; per evaluation:
eval/train_loss, eval/val_loss, eval/val_bpb. A tracker whose package is missing stops the run before
it starts, naming the package.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process

from launch import TrainingError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class CSVTracker(GeneralTracker):
    """A tracker with no dependency: RUN_DIR/tracking/metrics.csv (step, name, value) and config.json."""

    name = "csv"
    requires_logging_directory = True

    @on_main_process
    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.folder = Path(logging_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.csv"
        if not self.path.exists():
            self.path.write_text("step,name,value\n")

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        (self.folder / "config.json").write_text(json.dumps(values, indent=2, default=str))

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    writer.writerow([step, name, value])


def log_with(name: str, logging_dir: str) -> list | None:
    """What Accelerator(log_with=...) takes for train.log_with; a missing package is an error now."""
    if name == "none":
        return None
    if name == "csv":
        return [CSVTracker("gpt", logging_dir)]
    package = PACKAGES[name]
    if importlib.util.find_spec(package) is None and not (name == "tensorboard" and
                                                          importlib.util.find_spec("tensorboardX")):
        raise TrainingError(f"train.log_with={name} needs the {package} package: pip install {package}, or choose "
                            "another train.log_with (none, tensorboard, wandb, mlflow, csv)")
    return [name]
