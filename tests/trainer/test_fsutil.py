"""trainer.fsutil.save_figure: a plot appears whole or not at all."""

from __future__ import annotations

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.fsutil import save_figure  # noqa: E402


def _figure():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


def test_a_saved_figure_is_a_png_at_the_path_with_no_temporary_left(tmp_path):
    fig = _figure()
    save_figure(fig, tmp_path / "curves.png")
    plt.close(fig)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_a_failed_save_keeps_the_previous_plot_and_leaves_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "curves.png").write_bytes(b"the previous plot")
    fig = _figure()

    def fail_half_way(path, **kwargs):
        open(path, "wb").write(b"\x89PNG half")  # what a save killed part-way leaves behind
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path / "curves.png")
    plt.close(fig)
    assert (tmp_path / "curves.png").read_bytes() == b"the previous plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]
