"""attnkit.watchdog: the stall dump's timer is armed, re-armed by each beat and cancelled; bad waits are one error."""

from __future__ import annotations

import math

import pytest

from attnkit.watchdog import beat, check_seconds, stall_dump


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "5", None])
def test_a_wait_that_is_not_a_finite_positive_number_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=f"attnkit eval: --stall-dump {bad!r} is invalid; accepted: seconds > 0"):
        check_seconds(bad, "attnkit eval")
    assert check_seconds(3, "x") == 3.0 and isinstance(check_seconds(3, "x"), float)


def test_beats_rearm_the_armed_dump_only(dump_timer):
    beat()
    with stall_dump(None):
        beat()
    assert dump_timer == []  # nothing armed: beats do nothing
    with stall_dump(7):
        beat()
        beat()
    beat()
    assert dump_timer == [(7.0, True)] * 3 + ["cancel"]


def test_one_dump_at_a_time_and_an_error_still_disarms(dump_timer):
    with pytest.raises(KeyError):
        with stall_dump(5, "zoo sweep"):
            with pytest.raises(RuntimeError, match="zoo sweep: a stall dump is already armed in this process"):
                with stall_dump(9, "zoo sweep"):
                    pass
            beat()  # the outer one is still armed
            raise KeyError("boom")
    assert dump_timer == [(5.0, True), (5.0, True), "cancel"]
    with stall_dump(2):  # free again
        pass
    assert dump_timer[-2:] == [(2.0, True), "cancel"]
