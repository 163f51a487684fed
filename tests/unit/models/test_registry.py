"""The local model cache of `models.registry.load_version`: processes that start together all get
a complete copy, a failed download leaves nothing behind, and a re-created registry's v1 is not
the old v1's files."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from core.errors import ConfigError, ServiceUnavailableError
from core.settings import Settings, load_settings
from features import spec
from models import registry
from models.artifact import ChurnModel, save_artifact
from models.holder import ModelHolder
from tests.support import register_champion, small_model


def _scratch(folder: Path) -> Settings:
    """The settings `register_champion` registers with (its SQLite store and state folder)."""
    return load_settings(mlflow_tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", state_dir=folder / "state")


def _cached(settings: Settings) -> list[str]:
    """Returns the entries of the model's cache folder (version folders, and any leftovers)."""
    return sorted(p.name for p in (settings.state_dir / "model_cache").glob(f"*/{settings.model_name}/*"))


def test_loaders_starting_together_all_get_a_complete_copy_and_leave_nothing_else(tmp_path: Path) -> None:
    """API workers and scorers starting together on an empty cache (threads here, the same
    folders): before, each removed and renamed the same folder, and loads failed with
    `Directory not empty` or found no artifact between another's remove and rename."""
    register_champion(tmp_path, load_settings())
    settings = _scratch(tmp_path)
    registry.champion_version(settings)  # the SQLite store opened before the race
    start = threading.Barrier(8)
    failures: list[str] = []

    def load() -> None:
        start.wait()
        try:
            registry.load_version(settings, "1")
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            failures.append(f"{type(exc).__name__}: {exc}")

    loaders = [threading.Thread(target=load) for _ in range(8)]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.join(120)
    assert failures == []
    assert len(_cached(settings)) == 1  # one version folder, no download left beside it


def test_a_failed_download_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_champion(tmp_path, load_settings())

    def half_then_fail(artifact_uri: str, dst_path: str, tracking_uri: str) -> str:
        (Path(dst_path) / "model.txt").write_text("half a booster")
        msg = "connection reset while downloading"
        raise MlflowException(msg)

    monkeypatch.setattr("mlflow.artifacts.download_artifacts", half_then_fail)
    with pytest.raises(ServiceUnavailableError, match="connection reset"):
        registry.load_version(_scratch(tmp_path), "1")
    assert _cached(_scratch(tmp_path)) == []


def test_a_re_created_registry_s_v1_is_its_own_model_not_the_cached_one(tmp_path: Path) -> None:
    settings = _scratch(tmp_path)
    first, second = small_model(rounds=5), small_model(rounds=40)
    x = np.random.default_rng(1).random((20, len(spec.MODEL_FEATURES))) * 10
    assert not np.allclose(first.predict(x), second.predict(x))
    register_champion(tmp_path, load_settings(), first)
    assert np.allclose(registry.load_version(settings, "1").predict(x), first.predict(x))
    # The model is deleted and registered again (numbering restarts); the state folder stays.
    registry.registry_client(settings).delete_registered_model(settings.model_name)
    register_champion(tmp_path, load_settings(), second)
    assert registry.champion_version(settings) == "1"
    assert np.allclose(registry.load_version(settings, "1").predict(x), second.predict(x))


def _register_from_another_process(folder: Path, model: ChurnModel) -> None:
    """Registers `model` as champion in the SQLite store in `folder` from a new process (as a
    `churn train` would), so this process's cached MLflow store does not do it."""
    artifact = save_artifact(folder / "second", model.booster, model.meta)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from core.settings import load_settings\n"
        "from models.artifact import load_artifact\n"
        "from tests.support import register_champion\n"
        "register_champion(Path(sys.argv[1]), load_settings(), load_artifact(sys.argv[2]))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder), str(artifact)], check=True, timeout=120)


@pytest.mark.parametrize("recreated", ["model deleted", "store file removed"])
def test_a_running_holder_swaps_to_a_re_created_registry_s_v1(tmp_path: Path, recreated: str) -> None:
    """A scorer or API that polled v1, then the registry is re-created and a new v1 promoted:
    before, the holder compared version numbers, saw "1" again and kept the old model until a
    restart. When the SQLite store's file was removed (damaged, or to start afresh) and created
    again by another process's training, the holder kept its pooled connection to the removed
    file and served the old v1 until restarted."""
    settings = _scratch(tmp_path)
    first, second = small_model(rounds=5), small_model(rounds=40)
    x = np.random.default_rng(1).random((20, len(spec.MODEL_FEATURES))) * 10
    register_champion(tmp_path, load_settings(), first)
    holder = ModelHolder(*registry.champion_loader(settings))
    assert holder.refresh()
    assert not holder.refresh()  # the same champion: nothing to load
    if recreated == "model deleted":
        registry.registry_client(settings).delete_registered_model(settings.model_name)
        register_champion(tmp_path, load_settings(), second)
    else:
        (tmp_path / "mlflow.db").unlink()
        _register_from_another_process(tmp_path, second)
    assert holder.refresh()
    assert holder.current is not None
    assert holder.current.version == "1"
    assert np.allclose(holder.current.model.predict(x), second.predict(x))


def test_a_store_file_that_is_not_a_database_is_a_one_line_config_error(tmp_path: Path) -> None:
    """MLflow's own error for it is a SQLAlchemy DatabaseError nothing mapped: every command
    (train, retrain, promote, rollback, score) printed hundreds of lines of traceback, exit 1."""
    settings = _scratch(tmp_path)
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"\x93not a database" * 300)
    with pytest.raises(ConfigError, match=r"mlflow\.db is not a SQLite database"):
        registry.champion_version(settings)
    store.write_bytes(b"")  # empty: MLflow creates its tables in it
    assert registry.champion_version(settings) is None


def test_processes_opening_a_new_store_together_all_open_it(tmp_path: Path) -> None:
    """Two `churn train` started together on a new SQLite store: each found no tables and
    created them, and the second failed with a traceback (`table alembic_version already
    exists`). Four processes here, each opening the store once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys\n"
        "from core.settings import load_settings\n"
        "from models import registry\n"
        f"settings = load_settings(mlflow_tracking_uri={uri!r}, state_dir=sys.argv[1])\n"
        "print(registry.champion_version(settings))\n"
    )
    opened = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / f"state{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outcomes = [process.communicate(timeout=120) for process in opened]
    assert [process.returncode for process in opened] == [0] * 4, [err[-600:] for _, err in outcomes]
    assert [out.strip() for out, _ in outcomes] == ["None"] * 4


LOCKED = r"mlflow\.db cannot be opened: .*database is locked"


@contextlib.contextmanager
def _locked(database: Path, *first: str) -> Iterator[None]:
    """Holds `database` under an exclusive SQLite transaction (another process's lock), after
    running the `first` statements; rolls back on the way out."""
    holder = sqlite3.connect(database, isolation_level=None)
    for statement in first:
        holder.execute(statement)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_locked_store_is_a_one_line_unavailable_error_and_opens_once_released(tmp_path: Path) -> None:
    """Opening a store checks its tables outside MLflow's error mapping: a store another
    process held locked gave a SQLAlchemy traceback of a hundred lines from every command."""
    settings = _scratch(tmp_path)
    with (
        _locked(tmp_path / "mlflow.db", "CREATE TABLE other (x)"),
        pytest.raises(ServiceUnavailableError, match=LOCKED),
    ):
        registry.champion_version(settings)
    assert registry.champion_version(settings) is None  # not cached as failed: it opens now


def test_a_registry_store_locked_after_the_tracking_store_opened_is_an_unavailable_error(tmp_path: Path) -> None:
    """MLflow opens the model-registry store at a client's first registry call, outside its
    error mapping as the tracking store's opening is: a store locked between the two gave a raw
    SQLAlchemy error from `champion_version` (the scorer's and the API's model polls)."""
    settings = _scratch(tmp_path)
    MlflowClient(tracking_uri=settings.tracking_uri)  # the tracking store opened (and cached), not the registry's
    with _locked(tmp_path / "mlflow.db"), pytest.raises(ServiceUnavailableError, match=LOCKED):
        registry.champion_version(settings)
    assert registry.champion_version(settings) is None
