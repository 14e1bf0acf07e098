"""trainer.progress: a live bar on a terminal, one summary line per phase elsewhere, nothing when disabled."""

import io

from trainer.progress import PhaseSummary, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_phase_prints_one_summary_line_with_its_count_and_last_values():
    log = io.StringIO()
    bar = progress(range(400), desc="warm start (SFT)", unit="batch", stream=log, leave=False)
    assert isinstance(bar, PhaseSummary)
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in log.getvalue()
    assert lines[0].startswith("warm start (SFT): 400 batches in ") and lines[0].endswith(" s, loss 0.003")


def test_a_heartbeat_prints_where_a_long_phase_stands_off_a_terminal_with_its_eta():
    log = io.StringIO()
    bar = progress(range(4), desc="warm start (SFT)", unit="batch", stream=log, heartbeat_s=0.0)
    for _ in bar:
        bar.set_postfix(loss="0.500")
    lines = log.getvalue().splitlines()
    assert len(lines) == 5  # one per batch (a heartbeat of 0 s), then the summary
    assert lines[0].startswith("warm start (SFT): 1/4 batches, ") and ", ETA " in lines[0]
    assert lines[3].startswith("warm start (SFT): 4/4 batches, ") and lines[3].endswith(", ETA 0 s, loss 0.500")
    assert lines[4].startswith("warm start (SFT): 4 batches in ")


def test_a_counted_phase_reports_the_work_done_since_its_start_and_closes_once():
    log = io.StringIO()
    bar = progress(total=10, initial=4, desc="dler train", unit="step", stream=log)
    bar.update()
    bar.set_postfix_str("gsm8k main")  # a status of the moment, not a result: not in the summary
    bar.close()
    bar.close()
    assert log.getvalue().count("\n") == 1
    assert log.getvalue().startswith("dler train: 1 step in ") and log.getvalue().rstrip().endswith(" s")


def test_on_a_terminal_the_phase_draws_a_tqdm_bar():
    from tqdm import tqdm

    screen = Terminal()
    bar = progress(range(3), desc="merge: write", unit="tensor", stream=screen)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    assert "merge: write" in screen.getvalue() and "\r" in screen.getvalue()


def test_a_disabled_phase_prints_nothing_anywhere_and_still_iterates(capsys):
    log, screen = io.StringIO(), Terminal()
    for stream in (log, screen):
        bar = progress(range(5), desc="eval", unit="run", enabled=False, stream=stream)
        assert list(bar) == list(range(5))
        bar.set_postfix(loss="0.1")
        bar.update()
        bar.close()
    assert log.getvalue() == screen.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_library_bars_go_off_off_a_terminal_or_when_disabled_and_stay_as_they_are_on_one():
    from transformers.utils import logging as transformers_logging

    from trainer.progress import library_bars

    was_enabled = transformers_logging.is_progress_bar_enabled()
    try:
        transformers_logging.enable_progress_bar()
        library_bars(stream=Terminal())
        assert transformers_logging.is_progress_bar_enabled()
        library_bars(enabled=False, stream=Terminal())
        assert not transformers_logging.is_progress_bar_enabled()
        transformers_logging.enable_progress_bar()
        library_bars(stream=io.StringIO())
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        (transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar)()
