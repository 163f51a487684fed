"""Paging the at-risk list (`serving.risk.at_risk_page`) while members go stale under it."""

from __future__ import annotations

from collections.abc import Iterable

from serving.risk import at_risk_page
from stream.at_risk import InMemoryAtRiskIndex
from stream.risk_store import InMemoryRiskStore, RiskRow


def _row(user: str, probability: float, event_ms: int = 1_000) -> RiskRow:
    return RiskRow(user, probability, "high", "1", event_ms, 0, prediction_id=f"id-{user}")


def _all_pages(index: InMemoryAtRiskIndex, risks: InMemoryRiskStore, limit: int) -> list[str]:
    listed: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = at_risk_page(index, risks, "high", "probability", offset, limit)
        listed += [u.user_id for u in page.users]
        offset = page.next_offset
    return listed


def test_paging_on_past_expired_members_skips_no_live_user() -> None:
    """An expired row's member is pruned as a page finds it: every later member moves up a rank,
    and the next page must start that much earlier (before, "c" and "f" were never listed)."""
    index, risks = InMemoryAtRiskIndex(), InMemoryRiskStore()
    rows = [_row(user, 0.9 - i / 100) for i, user in enumerate("abcdefg")]
    index.update(rows)
    risks.write([r for r in rows if r.user_id not in ("b", "e")])  # b's and e's rows expired
    assert _all_pages(index, risks, 2) == ["a", "c", "d", "f", "g"]
    page = at_risk_page(index, risks, "high", "probability", 0, 10)
    assert (page.total, page.next_offset) == (5, None)


def test_a_member_re_added_while_a_page_was_read_is_not_pruned() -> None:
    """The scorer scores the user again (a new row, a new score) between the page's read of the
    rows and its prune: the user must stay listed (before, they left the list until their next
    event, which for an idle high-risk user may never come)."""
    index, risks = InMemoryAtRiskIndex(), InMemoryRiskStore()
    index.update([_row("a", 0.9)])  # its row expired: stale when read

    class RescoredDuringTheRead(InMemoryRiskStore):
        def read(self, user_ids: Iterable[str]) -> list[RiskRow | None]:
            found = super().read(user_ids)
            fresh = _row("a", 0.95, event_ms=2_000)
            risks.write([fresh])
            index.update([fresh])
            return found

    assert at_risk_page(index, RescoredDuringTheRead(), "high", "probability", 0, 10).users == []
    assert [u.user_id for u in at_risk_page(index, risks, "high", "probability", 0, 10).users] == ["a"]
