"""Which of two overlapping reads of a team's entry has the last word (see ReadOrder.taken)."""

from __future__ import annotations

import time
from collections.abc import Collection

# What a read found when the payload was gone (a contents key: an entry's is its (ETag, raw hash)).
DELETED = ("deleted",)
# After two overlapping reads saw different contents: equal to no contents, so only a read begun after both
# ended is taken.
_UNKNOWN = ("unknown",)
# A team's last read is remembered this long after it ended while nothing is held (a read lasts at most a
# few Redis timeouts).
LAST_READ_KEPT_SECONDS = 60.0


class ReadOrder:
    """Per team, the last read taken: when it began and ended, and what it found."""

    def __init__(self) -> None:
        # Per team, the last read this replica took the word of: (began, ended, contents). Reads overlap
        # (a 304's and a 200's, a request's and the refresher's) and a later-begun one can reach Redis first
        # (a wait for a pool connection), so neither when a read began nor when it ended orders two of them:
        # only one that began after the other ended is newer. See taken().
        self._last: dict[int, tuple[float, float, tuple[object, ...]]] = {}

    def taken(self, team_id: int, read_at: float, contents: tuple[object, ...]) -> bool:
        """Whether what a read begun at `read_at` (ended now) found is the latest word on the team: the
        same contents as the last read taken, or a read begun after that one ended.

        Otherwise the two overlapped (a read ending now cannot have ended before one already taken began)
        and found different contents: neither is trusted (the caller drops the entry it holds), and only a
        read begun after both ended is taken. What this read found goes to whoever waits for it, never held:
        this replica answered older flags after newer ones (found by three reviews, of orders by one end of
        the reads). The cost: a change seen by two overlapping reads is read once more.
        """
        ended = time.monotonic()
        last = self._last.get(team_id)
        if last is None or last[2] == contents or read_at >= last[1]:
            began = read_at if last is None or last[2] != contents else max(read_at, last[0])
            self._last[team_id] = (began, ended, contents)
            return True
        self._last[team_id] = (max(read_at, last[0]), ended, _UNKNOWN)
        return False

    def prune(self, held: Collection[int], now: float) -> None:
        """Forget teams no longer `held` whose last read ended long enough ago."""
        if len(self._last) <= len(held):
            return
        # Teams no longer held keep their last read only while a read begun before it ended may still
        # be under way.
        ended_before = now - LAST_READ_KEPT_SECONDS
        self._last = {t: last for t, last in self._last.items() if t in held or last[1] > ended_before}
