"""TensorBoard curves of a training stage (`RUN/tb/STAGE`), written by rank 0 beside `history.json`.

    tensorboard --logdir runs/demo/tb        # then open http://localhost:6006

The x axis is the optimizer step, for the per-step loss and learning rate and for the per-epoch numbers alike,
so the two line up; a resumed run purges what an interrupted one wrote after its last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

TB_DIR = "tb"  # RUN/tb/<stage>
# TensorBoard tag -> key of an epoch record (kdq.train `history.json`)
EPOCH_SCALARS = {
    "loss/total": "train_loss",
    "loss/soft": "train_soft_loss",
    "loss/hard": "train_hard_loss",
    "accuracy/train": "train_acc",
    "accuracy/val": "val_acc",
    "lr": "lr",
    "images_per_second": "images_per_second",
}


class ScalarLog:
    """One stage's event file; without a folder (other ranks, `--no-tensorboard`) every call does nothing."""

    def __init__(self, folder: Path | None, first_step: int = 0):
        self.writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when logging

            # A resume continues after step `first_step`: what an earlier writer logged beyond it is replaced.
            self.writer = SummaryWriter(str(folder), purge_step=first_step + 1 if first_step else None)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)

    def epoch(self, step: int, record: dict) -> None:
        if self.writer is not None:
            for tag, key in EPOCH_SCALARS.items():
                if key in record:
                    self.writer.add_scalar(tag, record[key], step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
