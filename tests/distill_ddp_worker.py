"""Run one distillation on a fixed toy problem and save the result.

Launched by ``tests/test_distill_ddp.py`` as ``torchrun --nproc_per_node N distill_ddp_worker.py OUT_DIR``
(each rank writes ``OUT_DIR/rank{R}.pt``) and imported for the single-process reference run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from fxcompress.distill import distill

GLOBAL_BATCH, STEPS = 16, 12


def run(out_dir: Path, world_size: int) -> dict:
    """Distil a small MLP into a smaller one; the DataLoader's batch is per rank, so
    ``GLOBAL_BATCH // world_size`` keeps the global batch the same for every world size."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    student = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(96, 8)
    loader = DataLoader(TensorDataset(x), batch_size=GLOBAL_BATCH // world_size, shuffle=False)
    _, history = distill(student, teacher, loader, steps=STEPS, loss="kl", optimizer="sgd", lr=0.5, seed=0,
                         checkpoint_dir=out_dir / "checkpoints", checkpoint_every=5, progress=False)
    return {"params": {k: v.detach().clone() for k, v in student.state_dict().items()}, "loss": history.loss}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = run(out, int(os.environ["WORLD_SIZE"]))
    torch.save(result, out / f"rank{os.environ['RANK']}.pt")
