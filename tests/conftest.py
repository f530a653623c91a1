import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep generated data sets out of the user's ~/.cache during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RESNORM_CACHE", str(tmp_path_factory.mktemp("resnorm-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests run tiny tensors: one intra-op thread avoids OpenMP start-up and wait costs
    (on a busy two-core machine, milliseconds per call instead of microseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
