"""The model registry, read side: which version is `champion`, and loading it.

Models load from the configured MLflow registry as model.txt + meta.json (see
`models.artifact`), never a pickle; each version is downloaded once into a local cache.
The write side (runs, new versions, gates, promotion) is `training.registry`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.errors import ConfigError, ModelRefusedError, ServiceUnavailableError
from core.settings import Settings, mask_url
from features.spec import MODEL_FEATURES, spec_version
from models.artifact import ChurnModel, load_artifact
from models.runtime import LoadedModel

CHAMPION, CHALLENGER = "champion", "challenger"
# Tracking URIs whose model-registry store this process has opened (see `registry_client`).
_REGISTRY_STORES_OPENED: set[str] = set()
PROMOTED_AT_TAG = "promoted_at"  # model-version tag: when the version became champion (UTC ISO 8601)


def registry_client(settings: Settings) -> Any:
    """Returns an MLflow client on the settings' tracking store and registry.

    Raises:
        ConfigError: the store is a SQLite file that is not a database (`check_sqlite_store`).
        ServiceUnavailableError: the SQL store cannot be opened (locked, unreachable).
    """
    from mlflow.tracking import MlflowClient  # heavy (seconds): imported on first use, not by every command
    from sqlalchemy.exc import SQLAlchemyError  # MLflow's SQL stores; imported with it

    check_sqlite_store(settings.tracking_uri)
    if _sqlite_path(settings.tracking_uri) is not None:
        # A SQLite store's file is opened by each query, not kept in MLflow's connection pool:
        # a file removed and created again (by another process's training) was otherwise never
        # seen, and a running scorer or API served the removed registry's champion until
        # restarted. MLflow's documented setting; one an operator set is kept.
        os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    with _store_creation_lock(settings.tracking_uri):
        try:
            client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
            if settings.tracking_uri not in _REGISTRY_STORES_OPENED:
                # MLflow opens the model-registry store at a client's first registry call (once
                # per process and URI; it keeps it), as unmapped as the tracking store's opening:
                # opened here, by one cheap query. Only the first time: every later call would
                # otherwise query a locked store while holding the creation lock, and other
                # processes' calls would queue behind it.
                client.search_registered_models(max_results=1)
                _REGISTRY_STORES_OPENED.add(settings.tracking_uri)
            return client
        except SQLAlchemyError as exc:
            # Opening the store checks its tables outside MLflow's error mapping: a locked
            # store gave a traceback of a hundred lines from every command.
            reason = str(exc).splitlines()[0]
            msg = f"the MLflow store at {mask_url(settings.tracking_uri)} cannot be opened: {reason}"
            raise ServiceUnavailableError(msg) from exc


@contextlib.contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """Holds an exclusive lock beside a `sqlite:///` store's file (`<file>.lock`) while MLflow
    opens it (nothing for other stores). Opening a store with no tables creates them, and
    processes that open a new store together each found none and created them: all but one
    failed (`table alembic_version already exists`). MLflow opens a store once per process."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow would: a new store's folder
        lock = path.with_name(path.name + ".lock").open("a")
    except OSError:  # a read-only folder: nothing can create the store there, nothing to serialize
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sqlite_path(uri: str) -> Path | None:
    """Returns the file of a `sqlite:///` store, or None for another kind of store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_store(uri: str) -> None:
    """Checks that a `sqlite:///` store's file, if it exists and is not empty, is a SQLite
    database (one that does not exist or is empty is created by MLflow).

    Raises:
        ConfigError: it is not, or cannot be read. MLflow's own error for it is a SQLAlchemy
            `DatabaseError` no caller maps: a traceback of hundreds of lines from every command.
    """
    path = _sqlite_path(uri)
    if path is None:
        return
    try:
        with path.open("rb") as store:
            head = store.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as exc:
        msg = f"the MLflow store {path} cannot be read: {exc}"
        raise ConfigError(msg) from exc
    if head and head != SQLITE_HEADER:
        msg = (
            f"the MLflow store {path} is not a SQLite database (damaged, or another file): restore it from a"
            " backup, or move it away to start an empty registry (CHURN_MLFLOW_TRACKING_URI)"
        )
        raise ConfigError(msg)


def champion_version(settings: Settings, alias: str = CHAMPION) -> str | None:
    """Returns the version number the `champion` alias (or `alias`) points at, or None if there is none.
    One registry lookup.

    Raises:
        ServiceUnavailableError: the tracking store cannot be reached.
    """
    found = _aliased(settings, alias)
    return None if found is None else str(found.version)


def champion_identity(settings: Settings, alias: str = CHAMPION) -> str | None:
    """Returns `<version>@<source key>` of the version the `champion` alias (or `alias`) points
    at, or None if there is none: what a running process polls for hot reload (one registry
    lookup). The version number alone does not tell models apart: a registry that was re-created
    (or a model deleted and registered again) numbers from 1 again.

    Raises:
        ServiceUnavailableError: the tracking store cannot be reached.
    """
    found = _aliased(settings, alias)
    return None if found is None else f"{found.version}@{source_key(found.source)}"


def source_key(source: object) -> str:
    """Returns the short digest of a model version's artifact source that tells versions of the
    same number apart (in the model cache's folder names and in `champion_identity`)."""
    return hashlib.sha256(str(source).encode()).hexdigest()[:12]


def _aliased(settings: Settings, alias: str) -> Any:
    """Returns the registry's model version that `alias` points at, or None.

    Raises:
        ServiceUnavailableError: the tracking store cannot be reached.
    """
    from mlflow.exceptions import MlflowException  # heavy: imported on first use

    try:
        return registry_client(settings).get_model_version_by_alias(settings.model_name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: {exc}"
        raise ServiceUnavailableError(msg) from exc


def load_version(settings: Settings, version: str) -> ChurnModel:
    """Returns the model of registry `version` (its `meta["source_key"]`: `source_key` of its
    artifact source), downloaded once into the local cache
    (<state_dir>/model_cache/<registry hash>/<model_name>/<version>-<source key>/).

    The cache is keyed by the version's artifact source as well as its number: a registry that
    was re-created (or a model deleted and registered again) numbers from 1 again, and keyed by
    number alone the old v1's files were served as the new v1. Processes that start together
    (API workers, scorers) may download the same version at once: each downloads beside the
    cache and renames its copy into place; the first rename wins and the others keep its copy.

    Raises:
        ServiceUnavailableError: the registry or artifact store cannot be reached.
        InvalidInputError: the downloaded files are not a model artifact.
    """
    import mlflow  # heavy (seconds): imported on first use
    from mlflow.exceptions import MlflowException  # heavy: imported on first use

    # Keyed by registry too: two registries sharing a state folder each number from 1.
    registry = hashlib.sha256(settings.tracking_uri.encode()).hexdigest()[:12]
    try:
        source = registry_client(settings).get_model_version(settings.model_name, version).source
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: cannot read {settings.model_name} v{version}: {exc}"
        raise ServiceUnavailableError(msg) from exc
    of_source = source_key(source)
    cache = settings.state_dir.resolve() / "model_cache" / registry / settings.model_name / f"{version}-{of_source}"
    if not (cache / "meta.json").exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}-"))
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(staging), tracking_uri=settings.tracking_uri
            )
            _install(Path(local), cache)
        except MlflowException as exc:
            msg = f"MLflow at {mask_url(settings.tracking_uri)}: cannot fetch {settings.model_name} v{version}: {exc}"
            raise ServiceUnavailableError(msg) from exc
        finally:  # a failed download leaves nothing behind (the holder tries again at each poll)
            shutil.rmtree(staging, ignore_errors=True)
    model = load_artifact(cache)
    model.meta["source_key"] = of_source
    return model


def _install(downloaded: Path, cache: Path) -> None:
    """Renames the complete `downloaded` folder to `cache` (atomic: a reader never sees a
    half-written folder). When another process's copy got there first, keeps that one; a
    leftover without `meta.json` (an interrupted older install) is set aside first.

    Raises:
        OSError: the folder cannot be renamed into place.
    """
    for _ in range(3):
        try:
            downloaded.rename(cache)  # refused when `cache` is a non-empty folder
            return
        except OSError:
            if (cache / "meta.json").exists():
                return  # another process installed the same version first
            aside = cache.with_name(f".{cache.name}-leftover-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):  # another process may have moved it
                cache.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
    downloaded.rename(cache)


def load_champion(settings: Settings, alias: str = CHAMPION) -> tuple[ChurnModel, str] | None:
    """Returns (model, version) of the current `champion` (or `alias`), or None if no version has it.

    Raises:
        ServiceUnavailableError: the registry or artifact store cannot be reached.
        InvalidInputError: the champion's files are not a model artifact.
    """
    from mlflow.exceptions import MlflowException  # heavy: imported on first use

    version = champion_version(settings, alias)
    if version is None:
        return None
    model = load_version(settings, version)
    try:
        tags = registry_client(settings).get_model_version(settings.model_name, version).tags
    except MlflowException as exc:
        msg = f"MLflow at {mask_url(settings.tracking_uri)}: cannot read {settings.model_name} v{version}: {exc}"
        raise ServiceUnavailableError(msg) from exc
    # The artifact is written before the decision; the promotion time lives on the version.
    model.meta["promoted_at"] = tags.get(PROMOTED_AT_TAG)
    return model, version


def check_against_spec(model: ChurnModel, version: str) -> None:
    """Checks that `model` reads exactly the running spec's features, in order, and was trained
    on the same spec version: a model that only has the same column count would score
    misaligned columns silently.

    Raises:
        ModelRefusedError: the feature list or the spec version differs (the message says how).
    """
    expected, got = list(MODEL_FEATURES), list(model.features)
    if got != expected:
        if sorted(got) == sorted(expected):
            first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
            how = f"same features in another order (column {first} is {got[first]!r}, the spec has {expected[first]!r})"
        else:
            missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
            how = f"{len(got)} features, the spec has {len(expected)} (missing {missing[:5]}, unknown {extra[:5]})"
        msg = f"model version {version} refused: {how}"
        raise ModelRefusedError(msg)
    if model.spec_version != spec_version():
        running = spec_version()
        msg = f"model version {version} refused: trained on spec {model.spec_version}, the code runs spec {running}"
        raise ModelRefusedError(msg)


def champion_loader(settings: Settings, threads: int = 0, alias: str = CHAMPION) -> tuple[Any, Any]:
    """Returns (identity_of_champion, load) for a `models.holder.ModelHolder`: the registry
    lookup to poll (`champion_identity`) and the loader of the champion (or of `alias`, e.g. the challenger) as a
    `LoadedModel` (with `threads` OpenMP threads per predict; 0 = LightGBM's default). The loader
    raises ModelRefusedError for a model that does not fit the running spec (see `check_against_spec`)."""

    def load() -> LoadedModel | None:
        found = load_champion(settings, alias)
        if found is None:
            return None
        model, version = found
        check_against_spec(model, version)
        loaded = replace(model, threads=threads) if threads else model
        return LoadedModel(loaded, settings.model_name, str(version), f"{version}@{model.meta['source_key']}")

    return (lambda: champion_identity(settings, alias)), load
