"""Distillation under ``torchrun --nproc_per_node 2`` on the CPU (Gloo) matches one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import distill_ddp_worker  # noqa: E402

WORKER = Path(distill_ddp_worker.__file__)


def test_two_process_torchrun_matches_single_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), f"{key} differs across ranks"
    assert (tmp_path / "checkpoints" / "checkpoint.pt").exists()  # written by rank 0

    single = distill_ddp_worker.run(tmp_path / "single", world_size=1)
    for key, value in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][key], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(single["loss"]), rtol=1e-4, atol=1e-6)
    assert single["loss"][-1] < single["loss"][0]
