"""The transition heatmaps: percentages and percentage points at a precision that shows a
group difference, and stars only where the printed value is not zero."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.axes import Axes

from nme.report import plot_transition_matrices, significant_cells

matplotlib.use("Agg")


def test_stars_need_an_interval_excluding_zero_and_a_nonzero_printed_value() -> None:
    diff = np.array([[3.2, -0.04], [0.04, -2.5]])  # percentage points
    low = np.array([[1.0, -0.08], [0.01, -4.0]])
    high = np.array([[5.0, -0.01], [0.07, 1.0]])
    stars = significant_cells(diff, low, high)
    # (0, 0): CI > 0 and 3.2 shown; (0, 1) and (1, 0): CI excludes 0 but "-0.0"/"0.0" shown;
    # (1, 1): -2.5 shown but its CI contains 0
    np.testing.assert_array_equal(stars, [[True, False], [False, False]])
    assert significant_cells(diff, low, high, decimals=2)[0, 1]  # -0.04 at two decimals


def test_heatmap_texts_are_percentages_with_intervals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = ["a", "b"]
    control = np.array([[0.70, 0.30], [0.45, 0.55]])
    depressed = np.array([[0.50, 0.50], [0.4996, 0.5004]])
    diff = control - depressed
    low, high = diff - 0.01, diff + 0.01
    captured: list[str] = []
    original = Axes.text

    def spy(self, x, y, s, *args, **kwargs):  # type: ignore[no-untyped-def]
        captured.append(s)
        return original(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(Axes, "text", spy)
    path = plot_transition_matrices({"control": control, "depressed": depressed}, states,
                                    tmp_path / "t.png", intervals=(diff, low, high))
    assert path.exists()
    assert "70.0" in captured and "55.0" in captured  # percent, one decimal
    diff_texts = captured[-4:]
    assert diff_texts[0] == "+20.0*\n[+19.0, +21.0]"
    assert diff_texts[1] == "-20.0*\n[-21.0, -19.0]"
    assert not any(t.startswith("-0.0") for t in captured)
