"""Shared test fixtures. Tests run on CPU with small synthetic data."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data, or skip when this checkout has no shared data beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """Each test starts and ends with an empty, unlocked gin config: bindings parsed by one
    test (train() in-process, build_from_config) must not change the models another
    builds, and a config one test finalized (locked) must not refuse the next one's."""
    import gin

    with gin.unlock_config():  # on exit: unlocked again, as it was on entry
        gin.clear_config()
        yield
        gin.clear_config()


# The slowest files first (seconds on 2 busy cores, from `--durations`): `make test` runs
# two pytest-xdist workers that take whole files in collection order, so a slow file
# collected last would leave one worker idle for minutes at the end.
SLOWEST_FIRST = ("test_reference_configs.py", "test_distribution.py", "test_backends.py",
                 "test_export.py", "test_task_defaults.py", "test_train_reliability.py",
                 "test_train.py", "test_serving_parity.py", "test_predict.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise
