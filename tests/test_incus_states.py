"""PylxdApi.instance_states: several live states asked at once, a bounded number in flight
(without a daemon: instance_state is replaced by a slow stand-in)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from incus_caddyfile import incus
from incus_caddyfile.incus import IncusError, PylxdApi


class SlowStates:
    """instance_state that takes a while, counting how many run at once."""

    def __init__(self, fail: str | None = None) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.asked: list[str] = []
        self.fail = fail

    def __call__(self, project: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.asked.append(name)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
        if name == self.fail:
            raise IncusError(f"Incus request instances/{name}/state failed: boom")
        return None if name == "gone" else {"status": "Running", "name": name}


def api_with(states: SlowStates) -> PylxdApi:
    api = PylxdApi.__new__(PylxdApi)  # no daemon: only instance_states is exercised
    api.instance_state = states  # type: ignore[method-assign]
    return api


def test_states_are_asked_a_bounded_number_at_a_time() -> None:
    states = SlowStates()
    keys = [("p", f"i{n}") for n in range(3 * incus.STATE_CONCURRENCY)] + [("p", "gone")]
    got = api_with(states).instance_states(keys)
    assert set(got) == set(keys) and got[("p", "gone")] is None
    assert got[("p", "i0")] == {"status": "Running", "name": "i0"}
    assert 1 < states.most <= incus.STATE_CONCURRENCY
    assert sorted(states.asked) == sorted(name for _, name in keys)  # each once


def test_one_failed_state_fails_them_all_after_every_answer() -> None:
    states = SlowStates(fail="i3")
    keys = [("p", f"i{n}") for n in range(10)]
    with pytest.raises(IncusError, match="i3") as failed:
        api_with(states).instance_states(keys)
    assert len(states.asked) == 10 and states.running == 0
    # what the others answered comes along, so that nobody asks them again
    assert isinstance(failed.value, incus.StatesFailed)
    assert set(failed.value.errors) == {("p", "i3")}
    assert set(failed.value.answers) == set(keys) - {("p", "i3")}


def test_nothing_to_ask_makes_no_request() -> None:
    states = SlowStates()
    assert api_with(states).instance_states([]) == {}
    assert states.asked == []
