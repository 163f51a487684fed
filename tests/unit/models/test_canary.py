"""The canary slice: a stable hash share of users, the same in every process."""

from __future__ import annotations

import subprocess
import sys

from models.runtime import LoadedModel, in_canary, split_canary
from tests.support import StandInModel

USERS = [f"user{i}" for i in range(10_000)]


def test_the_slice_holds_the_percentage_within_two_points_and_grows_by_adding() -> None:
    for percent in (1.0, 5.0, 10.0, 25.0, 50.0):
        share = sum(in_canary(u, percent) for u in USERS) / len(USERS)
        assert abs(share - percent / 100) <= 0.02, (percent, share)
    five, ten = {u for u in USERS if in_canary(u, 5.0)}, {u for u in USERS if in_canary(u, 10.0)}
    assert five < ten  # raising the percentage keeps every user already in the canary there
    assert not any(in_canary(u, 0.0) for u in USERS)
    assert all(in_canary(u, 100.0) for u in USERS)


def test_another_process_puts_the_same_users_in_the_slice() -> None:
    code = "from models.runtime import in_canary; print(sum(in_canary(f'user{i}', 10.0) * i for i in range(10000)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env={"PYTHONHASHSEED": "7"})
    assert int(other.stdout) == sum(in_canary(u, 10.0) * i for i, u in enumerate(USERS))


def test_split_sends_the_slice_to_the_challenger_only_when_one_differs() -> None:
    champion, challenger = LoadedModel(StandInModel(), "m", "1"), LoadedModel(StandInModel(), "m", "2")
    groups = split_canary(USERS, champion, challenger, 10.0)
    assert [(m.version, len(p)) for m, p in groups] == [("1", 10_000 - len(groups[1][1])), ("2", len(groups[1][1]))]
    assert all(in_canary(USERS[i], 10.0) for i in groups[1][1])
    assert split_canary(USERS, champion, None, 10.0) == [(champion, list(range(10_000)))]
    assert split_canary(USERS, champion, LoadedModel(StandInModel(), "m", "1"), 10.0)[0][0] is champion
