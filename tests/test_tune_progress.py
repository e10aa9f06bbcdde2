"""``hdm tune``'s display: one line per trial event when captured, a redrawn table on a terminal."""

from __future__ import annotations

import io
import math
import pickle
from types import SimpleNamespace

from hdm_platform.tune.progress import SweepProgress

KEYS = ["train.lr", "model.num_regions"]


def _trials() -> list[SimpleNamespace]:
    return [
        SimpleNamespace(trial_id="a1_00000", config={"train.lr": 1e-4, "model.num_regions": 3}, status="RUNNING"),
        SimpleNamespace(trial_id="a1_00001", config={"train.lr": 4e-4, "model.num_regions": 5}, status="PENDING"),
    ]


def test_captured_output_is_one_line_per_event_with_counts_and_the_best_so_far():
    stream = io.StringIO()
    progress = SweepProgress(KEYS, stream=stream, redraw=False)
    trials = _trials()
    progress.on_trial_start(0, trials, trials[0])
    progress.on_trial_result(1, trials, trials[0], {"epoch": 0, "val_psnr": float("nan")})
    progress.on_trial_result(2, trials, trials[0], {"epoch": 1, "val_psnr": 21.234})
    trials[1].status = "RUNNING"
    progress.on_trial_result(3, trials, trials[1], {"epoch": 0, "val_psnr": 22.5})
    progress.on_trial_complete(4, trials, trials[0])
    trials[0].status = "TERMINATED"
    trials[1].status = "ERROR"
    progress.on_trial_error(5, trials, trials[1])

    lines = stream.getvalue().splitlines()
    # The NaN report (an epoch without validation) shows nothing.
    assert len(lines) == 5
    assert lines[0].endswith(
        "trial a1_00000 started (train.lr=0.0001, model.num_regions=3) | "
        "1 running, 1 pending, 0 ended, 0 failed; no validation yet"
    )
    assert "trial a1_00000 epoch 2: val_psnr 21.23 | 1 running, 1 pending" in lines[1]
    assert lines[1].endswith("best val_psnr 21.23 (a1_00000)")
    assert lines[2].endswith("2 running, 0 pending, 0 ended, 0 failed; best val_psnr 22.50 (a1_00001)")
    # Tune calls on_trial_complete while the trial is still RUNNING: the display counts it ended.
    assert "trial a1_00000 ended | 1 running, 0 pending, 1 ended, 0 failed" in lines[3]
    assert "trial a1_00001 failed" in lines[4] and "0 running, 0 pending, 1 ended, 1 failed" in lines[4]
    assert all(line.startswith("[0:00] ") for line in lines)
    assert "\x1b[" not in stream.getvalue()


def test_a_terminal_gets_one_table_redrawn_in_place():
    stream = io.StringIO()
    progress = SweepProgress(KEYS, stream=stream, redraw=True)
    trials = _trials()
    progress.on_trial_start(0, trials, trials[0])
    progress.on_trial_result(1, trials, trials[0], {"epoch": 2, "val_psnr": 20.0})
    progress.on_trial_result(2, trials, trials[0], {"epoch": 3, "val_psnr": 19.5})

    first, second, third = stream.getvalue().split("\x1b[5F\x1b[J")
    first_lines = first.splitlines()
    # A summary, the header, one row per trial, the last event.
    assert len(first_lines) == 5
    assert first_lines[1].split() == ["trial", *KEYS, "status", "epochs", "val_psnr", "best"]
    assert first_lines[2].split() == ["a1_00000", "0.0001", "3", "running", "0", "-", "-"]
    # Each redraw moves up over the 5 lines drawn before and clears them.
    assert len(second.splitlines()) == len(third.splitlines()) == 5
    row = [line for line in third.splitlines() if line.startswith("a1_00000")][0]
    assert row.split() == ["a1_00000", "0.0001", "3", "running", "4", "19.5", "20"]
    assert third.splitlines()[-1] == "last: trial a1_00000 epoch 4: val_psnr 19.50"


def test_the_display_survives_tunes_pickling_of_its_run_config(capsys):
    progress = SweepProgress(KEYS)
    restored = pickle.loads(pickle.dumps(progress))
    trials = _trials()
    restored.on_trial_result(0, trials, trials[0], {"epoch": 0, "val_psnr": 18.0})
    # Without a stream it prints to the console of the process it runs in.
    assert "trial a1_00000 epoch 1: val_psnr 18.00" in capsys.readouterr().out
    assert not math.isnan(restored._scores["a1_00000"].best_psnr)
