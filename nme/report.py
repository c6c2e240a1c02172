"""Reports of an :class:`~nme.evaluation.EvaluationResult`: Markdown, JSON and PNG plots.

The main table is shaped like the paper's Table 3: one row per method, one column group per
placement, one column per metric; the per-person mean of each metric, the best value of each
column in bold. Marks compare a baseline with NME in the same placement column by the paired
person bootstrap (:func:`nme.metrics.paired_bootstrap`):

- ``†`` the baseline is significantly worse than NME (the interval of NME's advantage lies
  above 0);
- ``‡`` the baseline is significantly better than NME (the interval lies below 0) — reported
  too, because an honest table shows where NME loses.

Plots use matplotlib's non-interactive Agg backend, so they work on servers without a display.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from nme.evaluation import REFERENCE, EvaluationResult  # noqa: E402
from nme.metrics import METRIC_LABELS, higher_is_better, pearson_r  # noqa: E402

METHOD_LABELS = {"generic": "Generic", "specific": "Specific", "unme": "UNME", "nme": "NME",
                 "mlp-lme": "MLP-LME"}
WORSE, BETTER = "†", "‡"


# --------------------------------------------------------------------------- markdown
def _cell_value(result: EvaluationResult, method: str, placement: str, metric: str) -> float:
    run = result.run(method, placement)
    return float("nan") if run is None else run.summary[metric]["mean"]


def markdown_table(result: EvaluationResult, digits: int = 3) -> str:
    """The Table-3-shaped Markdown table (see the module docstring)."""
    placements = list(result.config.placements)
    metrics = result.metrics
    methods = list(result.config.methods)
    header = ["Method"] + [f"{p}: {METRIC_LABELS.get(m, m)}" for p in placements
                           for m in metrics]
    arrows = ["↓" if not higher_is_better(m) else "↑" for _ in placements for m in metrics]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "|".join("---:" for _ in arrows) + "|",
             "| " + " | ".join(["(better)", *arrows]) + " |"]
    best = {}
    for p in placements:
        for m in metrics:
            values = np.array([_cell_value(result, meth, p, m) for meth in methods])
            finite = values[np.isfinite(values)]
            if finite.size:
                best[p, m] = finite.max() if higher_is_better(m) else finite.min()
    for meth in methods:
        cells = [METHOD_LABELS.get(meth, meth)]
        for p in placements:
            for m in metrics:
                v = _cell_value(result, meth, p, m)
                if not np.isfinite(v):
                    cells.append("–")
                    continue
                text = f"{v:.{digits}f}"
                if (p, m) in best and round(v, digits) == round(best[p, m], digits):
                    text = f"**{text}**"
                comp = result.comparison(meth, p, m) if meth != REFERENCE else None
                if comp is not None and comp.baseline_worse:
                    text += WORSE
                elif comp is not None and comp.baseline_better:
                    text += BETTER
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons_table(result: EvaluationResult, digits: int = 3) -> str:
    """NME's advantage over each baseline with its bootstrap interval (positive = NME better)."""
    lines = ["| Baseline | vs NME | Metric | NME advantage | 95 % interval | persons | |",
             "|---|---|---|---:|---|---:|---|"]
    for c in result.comparisons:
        b = c.boot
        mark = WORSE if c.baseline_worse else BETTER if c.baseline_better else ""
        lines.append(
            f"| {METHOD_LABELS.get(c.method, c.method)}"
            f"{'' if c.placement is None else ' (' + c.placement + ')'} "
            f"| {c.reference_placement} | {METRIC_LABELS.get(c.metric, c.metric)} "
            f"| {b.diff:+.{digits}f} | [{b.low:+.{digits}f}, {b.high:+.{digits}f}] "
            f"| {b.n_persons} | {mark} |"
        )
    return "\n".join(lines)


def runs_table(result: EvaluationResult) -> str:
    """The grid point chosen on validation for every run, and its fit time."""
    primary = next(iter(result.runs.values())).grid[0]
    val_key = next(k for k in primary if k.startswith("val_"))
    lines = [f"| Run | lr | hidden | weight decay | validation {val_key[4:]} | fit s |"
             " NaN persons |", "|---|---:|---|---:|---:|---:|---:|"]
    for key, r in result.runs.items():
        nan = sum(int(r.per_person[m].isna().sum()) for m in result.metrics)
        lines.append(
            f"| {key} | {r.params['lr']:g} | {','.join(map(str, r.params['hidden'])) or '–'} "
            f"| {r.params['weight_decay']:g} | {r.val_score:.3f} | {r.fit_seconds:.1f} | {nan} |"
        )
    return "\n".join(lines)


def markdown_section(
    result: EvaluationResult, images: dict[str, str] | None = None, heading: str = "##",
    title: str | None = None, notes: Sequence[str] = (),
) -> str:
    """One dataset's section: summary, Table 3, bootstrap table, chosen runs, plots.

    ``images`` maps a caption to a path relative to the Markdown file.
    """
    d = result.data
    cfg = result.config
    out = [f"{heading} {title or d['name']}", ""]
    out.append(
        f"{d['persons']} persons ({d['dropped_persons']} dropped with fewer than "
        f"{cfg.min_test} test rows); rows train/validation/test "
        f"{d['rows']['train']}/{d['rows']['val']}/{d['rows']['test']} "
        f"(test rows per person: min {d['test_rows_per_person']['min']}, median "
        f"{d['test_rows_per_person']['median']:g}); target `{d['target']}`; features "
        f"{', '.join(f'`{f}`' for f in d['features'])}; grid `{cfg.grid}`, "
        f"{cfg.n_bootstrap} bootstrap resamples, seed {cfg.seed}."
    )
    out.extend(["", *notes, ""] if notes else [""])
    out += [markdown_table(result), "",
            f"Per-person means. **Bold**: best in the column. {WORSE}: significantly worse "
            f"than NME in the same column, {BETTER}: significantly better than NME (paired "
            f"person bootstrap, {cfg.level:.0%} interval excludes 0). Generic has no "
            "placement and appears under every one"
            + ("; MLP-LME has random effects on the last layer only." if "mlp-lme" in
               cfg.methods else "."), ""]
    out += [f"{heading}# Bootstrap intervals", "", comparisons_table(result), ""]
    out += [f"{heading}# Chosen hyper-parameters", "", runs_table(result), ""]
    trans = transitions_table(result)
    if trans:
        out += [f"{heading}# Transitions that differ between groups", "", trans, ""]
    for caption, path in (images or {}).items():
        out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- json
def write_json(result: EvaluationResult, path: str | Path) -> Path:
    """All numbers, including per-person metrics and every bootstrap interval."""
    path = Path(path)
    path.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
    return path


# --------------------------------------------------------------------------- plots
def plot_bias_vs_baseline(result: EvaluationResult, path: str | Path) -> Path | None:
    """Paper Figure 4: each person's shift of the prediction against their training baseline.

    One panel per run that has person effects (NME under each placement, and MLP-LME for
    comparison). The y value is :func:`nme.evaluation.prediction_shift`: the personalised
    prediction minus the same model's unknown-person prediction, averaged over the person's
    test rows — in the label's units for regression (log-odds of the second class for binary
    classification), the same quantity for every panel. Returns None when no run has one.
    """
    runs = [r for r in result.runs.values()
            if r.bias is not None and r.method in (REFERENCE, "mlp-lme")]
    runs.sort(key=lambda r: (r.method != REFERENCE, r.placement or ""))
    if not runs:
        return None
    # one quantity in one unit for every panel: a shared y axis compares them directly
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), squeeze=False,
                             sharey=True)
    target = result.data.get("target", "target")
    if result.config.task == "regression":
        ylabel = f"personalised − unknown-person prediction\n(mean over test rows, {target})"
        xlabel = f"person's mean training {target}"
    else:
        ylabel = ("personalised − unknown-person log-odds\nof the second class "
                  "(mean over test rows)")
        xlabel = "person's training share of the second class"
    for ax, r in zip(axes[0], runs, strict=True):
        both = r.bias.index.intersection(result.baseline.index)
        x = result.baseline.loc[both].to_numpy(float)
        y = r.bias.loc[both].to_numpy(float)
        ax.scatter(x, y, s=14, alpha=0.7)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{METHOD_LABELS[r.method]} ({r.placement}): r = {pearson_r(x, y):.2f}",
                     fontsize=10)
        ax.set_xlabel(xlabel)
    axes[0, 0].set_ylabel(ylabel)
    fig.suptitle(f"{result.data['name']}: person's prediction shift vs. training baseline",
                 fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_person(result: EvaluationResult, path: str | Path, metric: str | None = None
                    ) -> Path:
    """Box plot of a metric's per-person values for every run (default: the first metric)."""
    metric = metric or result.metrics[0]
    keys = list(result.runs)
    data = [result.runs[k].per_person[metric].dropna().to_numpy() for k in keys]
    fig, ax = plt.subplots(figsize=(1.1 * len(keys) + 2, 3.8))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(keys) + 1), keys, rotation=30, ha="right")
    ax.set_ylabel(f"per-person {METRIC_LABELS.get(metric, metric)}")
    ax.set_title(f"{result.data['name']}: per-person {METRIC_LABELS.get(metric, metric)} "
                 "on test", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_transition_matrices(
    means: dict[str, np.ndarray],
    states: Sequence[str],
    path: str | Path,
    intervals: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Per-group mean transition matrices (paper Table 5) and, optionally, their difference.

    Args:
        means: group name -> ``(S, S)`` mean transition probabilities.
        states: the S state names.
        intervals: ``(diff, low, high)`` each ``(S, S)`` for the first two groups (from
            :func:`nme.metrics.group_difference_bootstrap`); cells whose interval excludes 0
            are starred when their value, shown in percentage points to
            :data:`HEATMAP_DECIMALS` decimals, is not zero (:func:`significant_cells`).
    """
    panels = len(means) + (intervals is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3.8 * panels, 3.6), squeeze=False)
    for ax, (group, mat) in zip(axes[0], means.items(), strict=False):
        _heatmap(ax, 100 * np.asarray(mat), states, f"{group}: mean P(to | from), %", "viridis")
    if intervals is not None:
        diff, low, high = (100 * np.asarray(a) for a in intervals)  # percentage points
        names = list(means)
        ax = axes[0][-1]
        _heatmap(ax, diff, states,
                 f"{names[0]} − {names[1]}, pp [95 % CI]\n(* : CI excludes 0)", "coolwarm",
                 stars=significant_cells(diff, low, high), intervals=(low, high))
    fig.tight_layout()
    return _save(fig, path)


HEATMAP_DECIMALS = 1
"""Transition heatmaps show percentages and percentage-point differences to one decimal: a
group difference of a few points is visible, and 0.0 means below 0.05 points."""


def significant_cells(
    diff: np.ndarray, low: np.ndarray, high: np.ndarray, decimals: int = HEATMAP_DECIMALS
) -> np.ndarray:
    """``(S, S)`` bool: cells to star — the interval excludes 0 *and* the value, as shown at
    ``decimals``, is not zero (a star on a printed 0.0 or −0.0 would contradict the number).

    Args:
        diff, low, high: ``(S, S)`` the difference and its interval, in the units shown.
    """
    shown = np.round(np.asarray(diff, dtype=np.float64), decimals)
    return ((np.asarray(low) > 0) | (np.asarray(high) < 0)) & (shown != 0)


def _shown(value: float) -> float:
    """``value`` rounded as printed, with −0.0 turned into 0.0 (never print "-0.0")."""
    return round(float(value), HEATMAP_DECIMALS) + 0.0


def _heatmap(ax: plt.Axes, mat: np.ndarray, states: Sequence[str], title: str, cmap: str,
             stars: np.ndarray | None = None,
             intervals: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Cells in percent (viridis, 0-100) or percentage points (coolwarm, symmetric), with the
    interval under the value when given."""
    lim = np.abs(mat).max() or 1.0
    kwargs = {"vmin": -lim, "vmax": lim} if cmap == "coolwarm" else {"vmin": 0, "vmax": 100}
    ax.imshow(mat, cmap=cmap, **kwargs)
    fmt = f"{{:+.{HEATMAP_DECIMALS}f}}" if cmap == "coolwarm" else f"{{:.{HEATMAP_DECIMALS}f}}"
    for (i, j), v in np.ndenumerate(mat):
        mark = "*" if stars is not None and stars[i, j] else ""
        text = fmt.format(_shown(v)) + mark
        if intervals is not None:
            lo, hi = intervals[0][i, j], intervals[1][i, j]
            text += f"\n[{fmt.format(_shown(lo))}, {fmt.format(_shown(hi))}]"
        # white on viridis' dark low end, black elsewhere
        dark = cmap == "viridis" and v < 50
        ax.text(j, i, text, ha="center", va="center", fontsize=6 if intervals else 7,
                color="white" if dark else "black")
    ax.set_xticks(range(len(states)), states, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(states)), states, fontsize=7)
    ax.set_xlabel("to")
    ax.set_ylabel("from")
    ax.set_title(title, fontsize=9)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- everything
def write_plots(result: EvaluationResult, directory: str | Path, prefix: str = ""
                ) -> dict[str, Path]:
    """Write the PNGs; returns caption -> path."""
    directory = Path(directory)
    out: dict[str, Path] = {}
    bias = plot_bias_vs_baseline(result, directory / f"{prefix}bias_vs_baseline.png")
    if bias is not None:
        unit = "label units" if result.config.task == "regression" else "log-odds"
        caption = ("Each person's shift of the prediction by personalisation (personalised "
                   f"minus unknown-person prediction, mean over their test rows, {unit}) "
                   "against their mean training target (paper Figure 4)")
        out[caption] = bias
    metric = result.metrics[0]
    out[f"Per-person test {METRIC_LABELS.get(metric, metric)} of every run"] = plot_per_person(
        result, directory / f"{prefix}per_person_{metric}.png", metric)
    trans = result.extras.get("transitions")
    if trans:
        means = {g: np.asarray(m) for g, m in trans["groups"].items()}
        diff = trans.get("difference")
        intervals = None if diff is None else tuple(
            np.asarray(diff[k]) for k in ("diff", "low", "high"))
        caption = (f"Mean transition matrices per group ({trans['run']}) and their difference "
                   "with person-bootstrap intervals (paper Table 5)")
        out[caption] = plot_transition_matrices(
            means, trans["states"], directory / f"{prefix}transitions.png", intervals)
    return out


def transitions_table(result: EvaluationResult, digits: int = 3) -> str:
    """Transitions whose group difference has an interval excluding 0 (paper Table 5)."""
    trans = result.extras.get("transitions") or {}
    diff = trans.get("difference")
    if not diff:
        return ""
    a, b = diff["groups"]
    states = trans["states"]
    lines = [f"| from → to | {a} | {b} | {a} − {b} | 95 % interval |",
             "|---|---:|---:|---:|---|"]
    for i, s_from in enumerate(states):
        for j, s_to in enumerate(states):
            low, high = diff["low"][i][j], diff["high"][i][j]
            if low > 0 or high < 0:
                lines.append(
                    f"| {s_from} → {s_to} | {trans['groups'][a][i][j]:.{digits}f} "
                    f"| {trans['groups'][b][i][j]:.{digits}f} | {diff['diff'][i][j]:+.{digits}f} "
                    f"| [{low:+.{digits}f}, {high:+.{digits}f}] |")
    return "\n".join(lines)


def write_report(result: EvaluationResult, out: str | Path, title: str | None = None
                 ) -> dict[str, Path]:
    """``out/results.md``, ``out/results.json`` and the PNGs; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = write_plots(result, out)
    md = markdown_section(result, {c: p.name for c, p in images.items()}, heading="#",
                          title=title or f"NME evaluation: {result.data['name']}")
    (out / "results.md").write_text(md + "\n")
    paths = {"markdown": out / "results.md", "json": write_json(result, out / "results.json")}
    paths.update({p.stem: p for p in images.values()})
    return paths


def summary_frame(result: EvaluationResult) -> pd.DataFrame:
    """Per-person means as a tidy frame: one row per run, one column per metric."""
    return pd.DataFrame(
        {key: {m: r.summary[m]["mean"] for m in result.metrics} for key, r in result.runs.items()}
    ).T.rename_axis("run")


__all__ = [
    "markdown_section",
    "markdown_table",
    "plot_bias_vs_baseline",
    "plot_per_person",
    "plot_transition_matrices",
    "significant_cells",
    "summary_frame",
    "write_json",
    "write_plots",
    "write_report",
]
