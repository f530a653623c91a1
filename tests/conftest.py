import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep generated data sets out of the user's ~/.cache during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RESNORM_CACHE", str(tmp_path_factory.mktemp("resnorm-cache")))
    yield
    mp.undo()
