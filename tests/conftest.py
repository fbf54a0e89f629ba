"""Shared fixtures: a private image cache, small synthetic datasets and a real FERPlus subset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fersearch.data import SPLIT_DIRS, SPLITS, parse_label_csv, write_layout
from fersearch.synthetic import generate

REAL_FERPLUS = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ferplus").resolve()


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test writes its decoded-image caches into a temp folder, never the user's."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FERSEARCH_CACHE", str(cache))
    yield cache
    mp.undo()


# A configuration whose training loss turns NaN within its first epoch on make_synthetic's faces:
# a huge lr with heavy momentum, no batch norm, in steps of 8 faces (at batch 32 the loss of the
# FER2013-framed faces grows past 1e10 and stays finite for 3 epochs).
DIVERGES = {"lr": 10.0, "momentum": 0.99, "batch_norm": False, "batch_size": 8}


def make_synthetic(path: Path, train: int = 240, valid: int = 80, test: int = 80, seed: int = 0) -> Path:
    images, votes, split = generate({"train": train, "valid": valid, "test": test}, seed)
    write_layout(path, images, votes, split)
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in Microsoft's layout (read-only for tests: copy to modify)."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "ferplus")


@pytest.fixture
def synthetic_copy(synthetic_dir: Path, tmp_path: Path) -> Path:
    """A private copy a test may corrupt."""
    return Path(shutil.copytree(synthetic_dir, tmp_path / "ferplus"))


@pytest.fixture(scope="session")
def real_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first rows of each real FERPlus split, copied into Microsoft's layout."""
    if not (REAL_FERPLUS / "FER2013Train" / "label.csv").is_file():
        pytest.skip(f"real FERPlus not found at {REAL_FERPLUS}")
    out = tmp_path_factory.mktemp("real") / "ferplus"
    sizes = {"train": 600, "valid": 200, "test": 200}
    for split in SPLITS:
        folder = REAL_FERPLUS / SPLIT_DIRS[split]
        (out / SPLIT_DIRS[split]).mkdir(parents=True)
        lines = (folder / "label.csv").read_text().splitlines()[: sizes[split]]
        for line in lines:
            name = line.split(",", 1)[0]
            shutil.copy(folder / name, out / SPLIT_DIRS[split] / name)
        (out / SPLIT_DIRS[split] / "label.csv").write_text("\n".join(lines) + "\n")
    assert sum(1 for _ in parse_label_csv(out / "FER2013Test" / "label.csv")) == 200
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def ray_runtime():
    """One real local Ray runtime for the whole session (its start-up costs ~10 s)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from fersearch.ray_runtime import ray_on_loopback

        ray_on_loopback()  # as a local search starts it: on 127.0.0.1 only
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        from fersearch.ray_runtime import check_loopback_only

        check_loopback_only(ray.util.get_node_ip_address())  # as a local search checks it
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_search(ray_runtime, synthetic_dir, tmp_path_factory):
    """One finished 4-trial x 2-epoch search with a real MLflow store, shared by several tests."""
    from fersearch.search import SearchSettings, run_search

    mlruns = tmp_path_factory.mktemp("search") / "mlruns"
    lines: list[str] = []
    settings = SearchSettings(model="cnn", data_dir=synthetic_dir, name="smoke", mlruns=mlruns,
                              trials=4, max_epochs=2, cpus_per_trial=1, time_budget_s=3600, progress_every_s=0.5)
    outcome = run_search(settings, emit=lines.append)
    return outcome, mlruns, lines


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test (AssertionError) if the search gets as far as starting (or joining) Ray."""
    import fersearch.search

    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray was started before the bad option was refused")

    monkeypatch.setattr(fersearch.search, "init_ray", refuse)
