"""Feast online store figures on the configured Redis: our write path vs `store.push`, and reads.

Runs in a throwaway Feast project (own registry in a temp folder, own Redis keys, deleted
afterwards), so it never touches a running demo's rows.
"""

from __future__ import annotations

import random
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from core.settings import Settings
from features.feast_repo import apply_repo, repo_config_dict
from features.feast_store import FeastFeatureStore
from features.spec import INT_FEATURES, STORED_FEATURES
from features.store import FeatureRow

if TYPE_CHECKING:
    from feast import FeatureStore


def synthetic_rows(count: int, seed: int = 0, start_ms: int = 1_767_225_600_000) -> list[FeatureRow]:
    """Returns `count` rows of distinct users with plausible random values (counts, ratios)."""
    rng = random.Random(seed)  # noqa: S311 - benchmark data, not secrets
    return [
        FeatureRow(
            user_id=f"bench-{i}",
            last_event_ms=start_ms + i,
            values={
                name: rng.randint(0, 500) if name in INT_FEATURES else rng.random() * 10 for name in STORED_FEATURES
            },
        )
        for i in range(count)
    ]


def _percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 3),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
    }


def _latencies(call: Callable[[], object], times: int) -> list[float]:
    out = []
    for _ in range(times):
        began = time.perf_counter()
        call()
        out.append(time.perf_counter() - began)
    return out


def _single_row_latencies(write: Callable[[Sequence[FeatureRow]], None], rows: Sequence[FeatureRow]) -> list[float]:
    out = []
    for row in rows:
        began = time.perf_counter()
        write([row])
        out.append(time.perf_counter() - began)
    return out


def _stock_store(settings: Settings) -> FeatureStore:
    """Returns a Feast store on the same project and registry, but with Feast's stock `redis`
    online store: `FeastFeatureStore` on it takes the ValueProto path (the write before
    `features.redis_store`)."""
    from feast import FeatureStore, RepoConfig

    config = repo_config_dict(settings)
    config["online_store"] = {**config["online_store"], "type": "redis"}
    return FeatureStore(
        repo_path=str(settings.feast_repo_dir), config=RepoConfig(repo_path=settings.feast_repo_dir, **config)
    )


def bench_feast_write(
    settings: Settings, rows: int = 20_000, batch: int = 1_000, singles: int = 300
) -> dict[str, object]:
    """Returns write and read figures of the Feast online store on the configured Redis.

    `rows` rows go in `batch`-row batches through `FeastFeatureStore.write_rows` (serialized
    values to `ChurnRedisOnlineStore.online_write_batch`), through the same on Feast's stock
    `RedisOnlineStore` (ValueProtos; the write path before `features.redis_store`) and through
    `store.push` on both stores, batch by batch in turn so load on the machine hits all alike;
    then `singles` one-row writes each (push: ours only) and `singles * 3` one-user
    `get_online_features` reads. `*_cpu_us_per_row` is this process's CPU per row written
    (Redis's own work not included). `speedup*` figures are push time / write time;
    `stock_store_speedup` has both on the stock store (the figure before `features.redis_store`).

    Raises:
        ServiceUnavailableError: Redis cannot be reached.
        ConfigError: the settings give an invalid Feast config.
    """

    with tempfile.TemporaryDirectory(prefix="churn-feast-bench-") as folder:
        scratch = settings.model_copy(
            update={"feast_project": f"bench_{uuid.uuid4().hex[:10]}", "feast_repo": Path(folder) / "feast"}
        )
        feast = apply_repo(scratch)
        try:
            store = FeastFeatureStore(feast)
            stock = FeastFeatureStore(_stock_store(scratch))
            data = synthetic_rows(rows)
            # Warm all paths (connection, registry, lazy imports) outside the timings.
            store.write_rows(data[:1])
            stock.write_rows(data[:1])
            store.push_rows(data[:1])
            stock.push_rows(data[:1])
            fast_s = stock_s = push_s = stock_push_s = fast_cpu = stock_cpu = 0.0
            for i in range(0, rows, batch):
                chunk: Sequence[FeatureRow] = data[i : i + batch]
                began, began_cpu = time.perf_counter(), time.process_time()
                store.write_rows(chunk)
                fast_s += time.perf_counter() - began
                fast_cpu += time.process_time() - began_cpu
                began, began_cpu = time.perf_counter(), time.process_time()
                stock.write_rows(chunk)
                stock_s += time.perf_counter() - began
                stock_cpu += time.process_time() - began_cpu
                began = time.perf_counter()
                store.push_rows(chunk)
                push_s += time.perf_counter() - began
                began = time.perf_counter()
                stock.push_rows(chunk)
                stock_push_s += time.perf_counter() - began
            one = data[:singles]
            fast_single = _single_row_latencies(store.write_rows, one)
            stock_single = _single_row_latencies(stock.write_rows, one)
            push_single = _single_row_latencies(store.push_rows, one)
            ids = [row.user_id for row in data]
            rng = random.Random(1)  # noqa: S311 - which user to read, not a secret
            reads = _latencies(lambda: store.read_rows([rng.choice(ids)]), singles * 3)
        finally:
            feast.teardown()
    return {
        "rows": rows,
        "batch": batch,
        "features_per_row": len(STORED_FEATURES) + 1,
        "write_rows_per_second": round(rows / fast_s),
        "stock_store_write_rows_per_second": round(rows / stock_s),
        "write_cpu_us_per_row": round(1e6 * fast_cpu / rows, 2),
        "stock_store_write_cpu_us_per_row": round(1e6 * stock_cpu / rows, 2),
        "push_rows_per_second": round(rows / push_s),
        "stock_store_push_rows_per_second": round(rows / stock_push_s),
        "speedup": round(push_s / fast_s, 2),
        "stock_store_speedup": round(stock_push_s / stock_s, 2),
        "speedup_vs_stock_store_push": round(stock_push_s / fast_s, 2),
        "write_single_row": _percentiles_ms(fast_single),
        "stock_store_write_single_row": _percentiles_ms(stock_single),
        "push_single_row": _percentiles_ms(push_single),
        "get_online_features_one_user": _percentiles_ms(reads),
    }
