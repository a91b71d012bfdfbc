"""The run folder: what a run writes into out_dir (the tokenizer, metrics.jsonl and the tracker, loss.png, the
checkpoints), as run_train.py and run_rl.py both write it. With --overwrite the old run's files go only when the
new run writes its first checkpoint (trainer.preflight refused the folder earlier unless --resume or --overwrite)."""

import dataclasses
import shutil
from pathlib import Path

import checkpoint
import parallel
import trackers
from tokenizer import save_tokenizer
from trainer import RUN_FILES, MetricsLog, Progress, holds_run


class RunFolder:
    """out_dir as a run writes it: the tokenizer, metrics.jsonl (and the tracker), loss.png, the checkpoints.

    A run never destroys another silently (preflight). With --overwrite over an existing run, nothing is written
    until the first checkpoint, so a run that fails before it leaves the old one whole: then the old run's files
    go, and the rows logged so far are written."""

    def __init__(self, cfg, tokenizer, resumed_step: int | None, run_info: dict, master: bool):
        self.path, self.cfg, self.tokenizer, self.run_info, self.master = Path(cfg.out_dir), cfg, tokenizer, run_info, master
        self.log = MetricsLog(self.path / checkpoint.METRICS, enabled=master)
        self.replacing = cfg.overwrite and holds_run(self.path)
        if not self.replacing:
            self._open(resumed_step)

    def _open(self, resumed_step):
        tracker = None
        if self.master:
            if self.replacing:
                for name in RUN_FILES:
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            self.path.mkdir(parents=True, exist_ok=True)
            save_tokenizer(self.tokenizer, self.path / checkpoint.TOKENIZER_DIR)
            tracker = trackers.open_tracker(self.cfg.report_to, self.path, self.run_info, resumed_step)
        self.log.start(resumed_step, tracker)
        self.replacing = False

    def save(self, model, optimizers, scaler, batches, progress: Progress):
        """A checkpoint (checkpoint.save_checkpoint): every rank gathers the weights, rank 0 writes."""
        if not self.log.started:
            self._open(None)
        weights = parallel.full_state_dict(model)
        if parallel.sharded(model):  # fsdp: every rank writes its shard of the resume state
            checkpoint.save_sharded(self.path, model, optimizers, scaler, batches, dataclasses.asdict(progress),
                                    self.run_info, weights, self.master)
        elif self.master:
            checkpoint.save_checkpoint(self.path, model, optimizers, scaler, batches, dataclasses.asdict(progress),
                                       self.run_info, weights)
