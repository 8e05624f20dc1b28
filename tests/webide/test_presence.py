"""Presence bookkeeping: joins, leaves, and forgetting editors whose process died without a goodbye."""

from webide.presence import MISSED_BEATS, Presence


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_join_refresh_and_leave():
    clock = Clock()
    presence = Presence("me", "ada", clock=clock)
    assert presence.join("me", "ada") is False  # itself
    assert presence.join("c1", "bob") is True
    assert presence.join("c1", "bob") is False  # a beat from someone known refreshes, nothing new
    assert presence.join("c2", "bob") is True
    assert presence.snapshot() == [{"user": "ada", "editors": 1, "me": True},
                                   {"user": "bob", "editors": 2, "me": False}]
    assert presence.leave("c1") is True
    assert presence.leave("c1") is False
    assert [u["editors"] for u in presence.snapshot()] == [1, 1]


def test_silent_editors_expire_after_missed_beats_and_beating_ones_stay():
    clock = Clock()
    presence = Presence("me", "ada", clock=clock)
    presence.join("quiet", "bob")
    presence.join("beating", "cy")
    for _ in range(MISSED_BEATS):
        clock.now += 10
        presence.join("beating", "cy")
        assert presence.expire(10) is False
    clock.now += 0.5
    presence.join("beating", "cy")
    assert presence.expire(10) is True
    assert [u["user"] for u in presence.snapshot()] == ["ada", "cy"]
    assert presence.expire(10) is False
