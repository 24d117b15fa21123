import os

# One intra-op thread per test process and for the subprocesses tests start (CLI, torchrun): on a
# small machine the default (one OpenMP thread per core) in several processes oversubscribes the
# cores and makes the suite several times slower. Set before torch is imported.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
os.environ.setdefault("FXCOMPRESS_PROGRESS", "0")
# optimize(report=True) skips the report's latency columns: tests that check latency or the
# slower-than-input guard pass a ReportConfig, which is always honoured.
os.environ.setdefault("FXCOMPRESS_LATENCY", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True, scope="session")
def _kernel_timing_cache(tmp_path_factory):
    """Kernel timings measured by the tests go to a temporary cache, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FXCOMPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("fxcompress_cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
