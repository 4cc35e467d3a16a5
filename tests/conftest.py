"""Fixtures shared by every test file: the real-data prefix mirror beside the project, served over HTTP."""
import pytest

from tests.mirror import SHARED_DIR, serve


@pytest.fixture(scope="session")
def shared_dir():
    """../shared/quickdraw (read-only); the test is skipped where it is absent."""
    if not (SHARED_DIR / "full").is_dir():
        pytest.skip(f"../shared/quickdraw not found: {SHARED_DIR} is absent (tests on real drawings need it)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def mirror_url(shared_dir):
    """http://127.0.0.1:PORT/ serving ../shared/quickdraw with Range support, for the whole session."""
    with serve(shared_dir) as server:
        yield server.url
