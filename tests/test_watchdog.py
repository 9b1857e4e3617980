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


def test_a_silent_watched_thread_stops_the_others_beats_from_rearming(dump_timer, monkeypatch, capsys):
    import threading

    from attnkit import watchdog

    t = [0.0]
    monkeypatch.setattr(watchdog, "clock", lambda: t[0])
    entered, beat_now, done, leave = (threading.Event() for _ in range(4))

    def run() -> None:  # a run's thread: enters, beats once when told, then waits to leave
        with watchdog.watching("softmax d64 lr 0.01"):
            entered.set()
            beat_now.wait(5)
            beat()
            done.set()
            leave.wait(5)

    with stall_dump(10):
        thread = threading.Thread(target=run)
        thread.start()
        entered.wait(5)
        t[0] = 9.0
        beat()  # the run spoke 9 s ago: re-armed
        t[0] = 10.5
        beat()  # silent for 10.5 s >= 10: not re-armed, and named once
        t[0] = 11.0
        beat()
        assert capsys.readouterr().err.count("attnkit: softmax d64 lr 0.01: silent for 10 s; every thread's stack "
                                             "follows within 10 s unless it goes on") == 1
        beat_now.set()
        done.wait(5)  # the run spoke again at 11 s: beats re-arm again
        t[0] = 12.0
        beat()
        leave.set()
        thread.join()
        t[0] = 100.0
        beat()  # the run left: its silence no longer counts
    assert dump_timer == [(10.0, True)] * 5 + ["cancel"]  # armed; at 9; the run's beat at 11; at 12; at 100
    assert watchdog._watched == {}


def test_a_run_that_hangs_beside_one_that_goes_on_still_ends_the_sweep(tmp_path):
    """Two runs side by side: the one at lr 0.01 sleeps in its first step, the other (too slow a learning rate to
    stop early) logs an epoch every ~0.1 s.
    The sweep ends with status 1, the hung run named, within about twice the 2 s wait."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = (
        "import time\n"
        "import attnkit.zoo.train as t\n"
        "real = t.lr_at\n"
        "t.lr_at = lambda step, total, cfg: time.sleep(60) if cfg.lr == 0.01 else real(step, total, cfg)\n"
        "import sys\n"
        "from attnkit.cli import main\n"
        f"sys.exit(main(['zoo', 'sweep', '--mixers', 'softmax', '--shapes', '32x4', '--vocab-size', '64', "
        f"'--train-examples', '64', '--test-examples', '32', '--batch-size', '32', '--epochs', '400', "
        f"'--d-models', '16', '--lrs', '1e-05,0.01', '--db', {str(tmp_path / 'z.db')!r}, "
        f"'--checkpoints', {str(tmp_path / 'ck')!r}, "
        "'--no-progress', '--stall-dump', '2', '--concurrent', '2']))\n"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "attnkit: softmax d16 lr 0.01: silent for 2 s" in done.stderr
    assert "Timeout (0:00:02)!" in done.stderr and "in <lambda>" in done.stderr
    assert "softmax d16 lr 1e-05: epoch 3/400" in done.stderr  # the other run went on meanwhile
    assert time.monotonic() - start < 60
