"""Who has a function open in the IDE, kept by each connection from messages over the function's group.

No shared store: a newcomer announces itself (``presence.join``) to the group, everyone already there
answers it directly (``presence.here``), and a leaving connection says so (``presence.leave``). This
works the same with the in-memory layer (one process) and the Redis layer (many processes).

A connection whose process dies never says goodbye, so every connection also beats
(``presence.beat``) at a steady interval; one not heard from for a few beats is forgotten.
"""

from __future__ import annotations

import time

MISSED_BEATS = 3  # a connection silent this many intervals is taken for gone


class Presence:
    """One connection's view of the others: {channel name: (username, last heard)}, plus itself."""

    def __init__(self, channel: str, username: str, *, clock=time.monotonic):
        self.channel = channel
        self.username = username
        self.clock = clock
        self.others: dict[str, tuple[str, float]] = {}

    def join(self, channel: str, username: str) -> bool:
        """Record (or refresh) a connection; True when it is someone else and new to us."""
        if channel == self.channel:
            return False
        new = channel not in self.others
        self.others[channel] = (username, self.clock())
        return new

    def leave(self, channel: str) -> bool:
        return self.others.pop(channel, None) is not None

    def expire(self, interval: float) -> bool:
        """Forget connections not heard from for MISSED_BEATS intervals; True when any went."""
        oldest = self.clock() - MISSED_BEATS * interval
        gone = [channel for channel, (_, heard) in self.others.items() if heard < oldest]
        for channel in gone:
            del self.others[channel]
        return bool(gone)

    def snapshot(self) -> list[dict]:
        """Users with the function open, one entry per user with their number of open editors."""
        counts: dict[str, int] = {self.username: 1}
        for username, _ in self.others.values():
            counts[username] = counts.get(username, 0) + 1
        return [{"user": user, "editors": n, "me": user == self.username} for user, n in sorted(counts.items())]
