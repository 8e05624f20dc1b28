"""Who has a function open in the IDE, kept by each connection from messages over the function's group.

No shared store: a newcomer announces itself (``presence.join``) to the group, everyone already there
answers it directly (``presence.here``), and a leaving connection says so (``presence.leave``). This
works the same with the in-memory layer (one process) and the Redis layer (many processes).
"""

from __future__ import annotations


class Presence:
    """One connection's view of the others: {channel name: username}, plus itself."""

    def __init__(self, channel: str, username: str):
        self.channel = channel
        self.username = username
        self.others: dict[str, str] = {}

    def join(self, channel: str, username: str) -> bool:
        """Record a connection; True when it is someone else and new to us (so we should answer it)."""
        if channel == self.channel or channel in self.others:
            return False
        self.others[channel] = username
        return True

    def leave(self, channel: str) -> bool:
        return self.others.pop(channel, None) is not None

    def snapshot(self) -> list[dict]:
        """Users with the function open, one entry per user with their number of open editors."""
        counts: dict[str, int] = {self.username: 1}
        for username in self.others.values():
            counts[username] = counts.get(username, 0) + 1
        return [{"user": user, "editors": n, "me": user == self.username} for user, n in sorted(counts.items())]
