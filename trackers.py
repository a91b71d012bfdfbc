"""Experiment trackers, the `transformers` way: `--report_to tensorboard|wandb` sends every metrics.jsonl row,
under the same keys, to TensorBoard or Weights & Biases, with the run's config and its loss curve.

    tracker = open_tracker("tensorboard", out_dir, config, resumed_step=None)   # None for --report_to none
    tracker.log(row)             # a metrics row: {"step": ..., "loss": ..., ...}
    tracker.figure("loss", fig, step)

Neither package is a requirement: `check` says in one line what to install. Only rank 0 opens a tracker.
TensorBoard writes event files under out_dir/runs/; a resumed run drops the events its killed predecessor wrote
after the checkpoint (purge_step), as metrics.jsonl drops its lines. W&B keeps its files under out_dir/wandb/
and a resumed run continues the same W&B run (its id is kept there); WANDB_MODE=offline needs no network.
"""

import json
import uuid
from pathlib import Path

REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrackerMissing(Exception):
    """The package a --report_to choice needs is not installed."""


def check(report_to: str):
    """TrackerMissing (one line, with the pip command) unless the tracker's package imports."""
    if report_to == "none":
        return
    try:
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (needs the tensorboard package)
        else:
            import wandb  # noqa: F401
    except ImportError:
        raise TrackerMissing(f"--report_to {report_to} needs the {PACKAGES[report_to]} package: "
                             f"pip install {PACKAGES[report_to]} (or --report_to none)") from None


def open_tracker(report_to: str, out_dir, config: dict, resumed_step: int | None = None):
    """The tracker for `report_to`, logging into out_dir, or None for "none"."""
    check(report_to)
    if report_to == "tensorboard":
        return TensorBoard(Path(out_dir), config, resumed_step)
    if report_to == "wandb":
        return WandB(Path(out_dir), config, resumed_step)
    return None


def scalars(row: dict) -> dict:
    """The numbers of a metrics row, by key (the step apart)."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, out_dir: Path, config: dict, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events at later steps (written after the checkpoint we resume from) are dropped
        self.writer = SummaryWriter(log_dir=str(out_dir / "runs"),
                                    purge_step=None if resumed_step is None else resumed_step + 1)
        if resumed_step is None:
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=2, default=str)}\n```")

    def log(self, row: dict):
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()  # a row every log_every steps: cheap, and nothing is lost if the run is killed

    def figure(self, name: str, fig, step: int):
        self.writer.add_figure(name, fig, step, close=False)
        self.writer.flush()


class WandB:
    def __init__(self, out_dir: Path, config: dict, resumed_step: int | None):
        import wandb
        id_file = out_dir / "wandb" / "blueberry-run-id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if resumed_step is not None and id_file.exists() else uuid.uuid4().hex[:8]
        self.run = wandb.init(project="blueberry", name=out_dir.resolve().name, dir=str(out_dir), config=config,
                              id=run_id, resume="allow")
        id_file.write_text(run_id)

    def log(self, row: dict):
        self.run.log(scalars(row), step=row["step"])

    def figure(self, name: str, fig, step: int):
        import wandb
        self.run.log({name: wandb.Image(fig)}, step=step)
