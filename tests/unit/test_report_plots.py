"""The run report's eval plot: whole-number rounds on its axis and the centralized baseline drawn."""

from __future__ import annotations

from fedsea.federation.report import eval_figure

EVALS = [{"type": "eval", "round": r, "accuracy": 0.5 + 0.1 * r} for r in range(3)]


def test_rounds_are_whole_numbers_and_the_baseline_is_drawn():
    fig = eval_figure(EVALS, central=0.8)
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    flat = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1]
    assert [float(line.get_ydata()[0]) for line in flat] == [0.8]
    assert "centralized" in [t.get_text() for t in ax.get_legend().get_texts()][1]


def test_without_a_baseline_only_the_federated_curve():
    ax = eval_figure(EVALS).axes[0]
    assert len(ax.get_lines()) == 1 and ax.get_legend() is None
