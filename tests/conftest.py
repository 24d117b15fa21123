import pytest
import torch


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
