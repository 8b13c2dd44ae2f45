"""Pictures of a :class:`~samplerkit.trace.Trace` (``samplerkit explain --plot``), drawn with
matplotlib, an optional extra: ``pip install 'samplerkit[plot]'``.

:func:`step_figure` draws one step: a panel per stage, titled with the stage, its kept count
and entropy; the same tokens in every panel (the input's most likely ones, then any other token
a stage ranks among its top), each bar the token's probability under that stage. A token a
stage removed is drawn grey, at the probability it had just before its removal, so what each
truncation threw away stays visible; the token that was drawn is outlined.

:func:`steps_figure` draws a generation (``--all-steps``): per stage, the kept-set size (log
scale) and the entropy at every step, along the generated tokens.

Figures are made with :class:`matplotlib.figure.Figure` directly (no pyplot: no global state,
no window); :func:`save` writes ``.png``, ``.svg`` or ``.html`` (an HTML page embedding the SVG).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from samplerkit.errors import SamplerkitError
from samplerkit.trace import STAGE_INPUT, Trace

#: The formats :func:`save` writes, by file suffix.
FORMATS = (".png", ".svg", ".html")
#: Colours: kept tokens, removed tokens, the drawn token's outline.
KEPT, REMOVED, DRAWN = "#3b75af", "#c8c8c8", "#d62728"


def _matplotlib():
    """The matplotlib Figure class, or a clear error naming the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SamplerkitError("drawing plots needs matplotlib, an optional extra: pip install 'samplerkit[plot]'") from None
    return Figure


def check_path(path: str | Path) -> Path:
    """``path`` if its suffix is a format :func:`save` writes, else an error saying which."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise SamplerkitError(f"--plot {path}: unknown picture format {path.suffix or '(no suffix)'!r}; "
                              f"name a file ending in {', '.join(FORMATS)}")
    return path


def label(text: str) -> str:
    """A token's text as a bar label: quoted, whitespace and control characters escaped, so
    ``' the'`` and ``'\\n'`` are told apart (matplotlib would render a newline as a line break)."""
    shown = repr(text)
    return shown.replace("$", r"\$")          # no mathtext


def token_set(trace: Trace, row: int = 0, tokens: int = 10) -> list[int]:
    """The tokens :func:`step_figure` shows: the input's ``tokens`` most likely, then tokens
    that a later stage ranks among its top but the input did not (a penalty or bias can raise
    one), at most ``tokens + 5`` in all."""
    chosen: list[int] = []
    for stage in trace.stages:
        limit = tokens if stage.name == STAGE_INPUT else tokens + 5
        n = min(tokens, int(stage.kept[row]))
        if n < 1 or stage.invalid[row] is not None:
            continue
        for t in stage.probs()[row].topk(n).indices.tolist():
            if t not in chosen and len(chosen) < limit:
                chosen.append(t)
    return chosen


def step_figure(trace: Trace, decode: Callable[[int], str], *, row: int = 0, drawn: int | None = None,
                tokens: int = 10, title: str | None = None) -> Any:
    """One panel per stage of ``trace`` (``row``): bars of the shown tokens' probabilities,
    removed ones grey, ``drawn`` outlined. Returns the matplotlib Figure."""
    Figure = _matplotlib()
    ids = token_set(trace, row, tokens)
    labels = [label(decode(t)) for t in ids]
    stages = trace.stages
    fig = Figure(figsize=(max(6.0, 0.55 * len(ids) + 2.5), 1.9 * len(stages) + 0.9), layout="constrained")
    axes = fig.subplots(len(stages), 1, sharex=True, squeeze=False)[:, 0]
    previous = None
    for ax, stage in zip(axes, stages):
        probs = stage.probs()[row]
        removed_at = trace.removed_at[row]
        heights, colors, hatches = [], [], []
        for t in ids:
            index = int(removed_at[t])
            gone = 0 <= index <= stages.index(stage)
            if gone:
                # The probability it had just before the stage that removed it.
                before = stages[index - 1].probs()[row][t] if index > 0 else 0.0
                heights.append(float(before))
            else:
                heights.append(float(probs[t]))
            colors.append(REMOVED if gone else KEPT)
            hatches.append("//" if gone else "")
        bars = ax.bar(range(len(ids)), heights, color=colors, edgecolor=[
            DRAWN if t == drawn else "none" for t in ids], linewidth=[2.0 if t == drawn else 0 for t in ids])
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        # A removed token's bar can be too short to see: mark it with a cross above the bar too.
        gone_x = [i for i, h in enumerate(hatches) if h]
        if gone_x:
            top = max(heights, default=0.0)
            ax.scatter(gone_x, [heights[i] + 0.04 * top for i in gone_x], marker="x", s=18, color="#707070",
                       linewidths=1.2, zorder=3)
        neutral = "" if stage.name == STAGE_INPUT or bool(stage.active[row]) else ", neutral"
        entropy = stage.entropy[row]
        where = "" if stage.name == STAGE_INPUT else f" ({stage.location})"
        ax.set_title(f"{stage.name}{where}: kept {int(stage.kept[row])}, H = {float(entropy):.2f} nats{neutral}",
                     loc="left", fontsize=9)
        ax.set_ylabel("p", fontsize=8)
        ax.set_ylim(0, max(1e-9, max(heights, default=0.0)) * 1.15)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        previous = ax
    if previous is not None:
        previous.set_xticks(range(len(ids)), labels, rotation=45, ha="right", fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color=KEPT, label="kept (probability at this stage)"),
               Patch(facecolor=REMOVED, hatch="//", label="removed: x (bar: probability before removal)")]
    if drawn is not None and drawn in ids:
        handles.append(Patch(facecolor="white", edgecolor=DRAWN, linewidth=2, label="drawn"))
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=len(handles))
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    return fig


def steps_figure(traces: Sequence[Trace], tokens: Sequence[str], *, row: int = 0, title: str | None = None) -> Any:
    """Two panels along the generated ``tokens`` (one trace per step): each stage's kept-set
    size (log scale) and its entropy in nats. Returns the matplotlib Figure."""
    Figure = _matplotlib()
    if not traces:
        raise SamplerkitError("no steps to plot: the generation produced no token")
    names = traces[0].names
    steps = range(len(traces))
    fig = Figure(figsize=(max(7.0, 0.35 * len(traces) + 3.0), 6.0), layout="constrained")
    kept_ax, entropy_ax = fig.subplots(2, 1, sharex=True)
    for i, name in enumerate(names):
        kept = [int(t.stages[i].kept[row]) for t in traces]
        entropy = [float(t.stages[i].entropy[row]) for t in traces]
        # Stages that agree (temperature keeps every token) overlap: vary the dash and marker too.
        style = {"marker": "os^vD"[i % 5], "markersize": 3.5, "linewidth": 1.3, "label": name,
                 "linestyle": ("-", "--", ":", "-.")[i % 4]}
        kept_ax.plot(steps, kept, **style)
        entropy_ax.plot(steps, entropy, **style)
    kept_ax.set_yscale("log")
    kept_ax.set_title("kept tokens after each stage", loc="left", fontsize=9)
    kept_ax.set_ylabel("kept (log)", fontsize=8)
    entropy_ax.set_title("entropy after each stage", loc="left", fontsize=9)
    entropy_ax.set_ylabel("H (nats)", fontsize=8)
    for ax in (kept_ax, entropy_ax):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    entropy_ax.set_xticks(list(steps), [label(t) for t in tokens], rotation=60, ha="right", fontsize=8)
    entropy_ax.set_xlabel("generated token", fontsize=8)
    kept_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    return fig


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path``: PNG (150 dpi), SVG, or an HTML page embedding the SVG."""
    from matplotlib import rc_context

    path = check_path(path)
    suffix = path.suffix.lower()
    try:
        # SVG text stays text (searchable, and half the size of glyph outlines); fixed ids
        # (hashsalt) so the same trace gives the same file.
        with rc_context({"svg.fonttype": "none", "svg.hashsalt": "samplerkit"}):
            _write(fig, path, suffix)
    except OSError as exc:
        raise SamplerkitError(f"--plot {path}: cannot write the picture: {exc.strerror or exc}") from None
    return path


def _write(fig: Any, path: Path, suffix: str) -> None:
    if suffix == ".html":
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
        svg = buffer.getvalue()
        svg = svg[svg.index("<svg"):]                  # drop the XML prolog inside HTML
        path.write_text(f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>samplerkit explain</title>"
                        f"</head>\n<body>\n{svg}\n</body></html>\n", encoding="utf-8")
    else:
        # No date in an SVG: the same trace gives the same file.
        fig.savefig(path, format=suffix[1:], dpi=150, **({"metadata": {"Date": None}} if suffix == ".svg" else {}))


__all__ = ["FORMATS", "check_path", "label", "save", "step_figure", "steps_figure", "token_set"]
