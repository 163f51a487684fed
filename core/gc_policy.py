"""Garbage-collector policy of long-running processes (scorer, archiver, API).

CPython's cyclic collector now and then runs a full collection that walks every tracked
container of the process. Ours hold many long-lived ones: the imported Feast, MLflow, pandas
and protobuf modules (hundreds of thousands of objects) and the scorer's user states (a few
lists and dicts per user). Measured in the scorer at 10,000 events/s:
12 full collections in a minute, up to 0.58 s each, every one a stall of the whole loop and
the cause of most of the freshness p99. Objects that live for the process's lifetime never
become cyclic garbage we care about, so walking them is wasted work.

`freeze_survivors()` collects what the last unit of work (a batch, the start-up) left as
cyclic garbage, scanning only objects created since the previous call, and then moves every
survivor to the permanent generation, which the collector never walks again. A survivor
freed later by reference counting is freed as usual; only a frozen object that later ends up
in a reference cycle would stay, which `release_frozen()` undoes (on a model swap).
"""

from __future__ import annotations

import gc


def freeze_survivors() -> None:
    """Collects cyclic garbage among the objects created since the last call, then freezes the
    rest so later collections skip them. Cost: proportional to those new objects only."""
    gc.collect()
    gc.freeze()


def release_frozen() -> None:
    """Returns the frozen objects to the collector and runs one full collection (a pause of up
    to a fraction of a second: for rare events such as a model swap), then freezes again."""
    gc.unfreeze()
    freeze_survivors()
