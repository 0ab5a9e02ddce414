"""Shared fixtures. Service fixtures (PostgreSQL, Redis, S3) live in tests/helpers/services.py."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.helpers.services"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

#: Where the longest tests are, longest first. They start first, so that the pytest-xdist
#: workers finish together instead of one waiting out a long test started last.
LONGEST_FIRST = (
    "tests/reliability/",  # one xdist group: run one after the other on one worker
    "tests/worker/research/test_training.py",
    "tests/worker/research/test_model_card_scripts.py",
    "tests/benchmarks/",
    "tests/e2e/",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first, the longest of them before the others; the order is otherwise kept."""

    def rank(item: pytest.Item) -> int:
        for position, prefix in enumerate(LONGEST_FIRST):
            if item.nodeid.startswith(prefix):
                return position if prefix.startswith("tests/reliability") or item.get_closest_marker("slow") else 99
        return len(LONGEST_FIRST) if item.get_closest_marker("slow") else len(LONGEST_FIRST) + 1

    items.sort(key=rank)


def shared_data_dir(name: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {name!r} is absent: expected at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture()
def real_ge_ct() -> Path:
    """The real GE head CT (gantry tilt +18.5 deg, uneven gaps, no hemorrhage)."""
    return shared_data_dir("real-head-ct-ge")


@pytest.fixture()
def philips_study() -> Path:
    """The Philips skull-phantom study: a scout, an axial series and screenshots."""
    return shared_data_dir("philips-phantom-study")


@pytest.fixture()
def drunet_slices() -> Path:
    """14 real 8-bit hemorrhage slices (JPEG data with .png names), no masks."""
    return shared_data_dir("drunet-test-slices")


@pytest.fixture()
def drunet_slice_masks() -> Path:
    """Reference masks for 13 of the 14 real slices (thresholded and chosen by eye, not a radiologist's)."""
    return shared_data_dir("drunet-test-slices-masks")


@pytest.fixture()
def blast_ct_assets() -> Path:
    return shared_data_dir("blast-ct-assets")


TINY_INPUT = 32


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained DR-UNet (dims 4, 32x32 input) saved with metadata: fast, for plumbing tests."""
    from worker.model.networks import build_drunet, save_model
    from worker.model.weights import ModelInfo

    model = build_drunet(dims=4, input_size=TINY_INPUT)
    info = ModelInfo(
        name="DR-UNet",
        architecture="drunet",
        dims=4,
        input_size=TINY_INPUT,
        hu_window=(-20.0, 100.0),
        version="tiny-test-1",
        training_data="none (random initialisation, for tests)",
    )
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.keras", info)
