"""Drawing a run's timeline (``spotsafe report --plot FILE`` and the dashboard) with matplotlib.

Three panels share one time axis (seconds, minutes or hours since the run's first event): the attempts as bars
(coloured by market) with notices, interruptions, restarts and checkpoints marked; training
progress (step) per attempt, with commits and restores; and cumulative cost against what the
same progress would have cost on demand. The title carries the report's headline figures.

Every string drawn goes through :func:`plain`: matplotlib reads text between two ``$`` as math (so
"$0.02 spent vs $0.05 on demand" would lose its dollar signs and come out in italics).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from spotsafe.errors import ConfigError
from spotsafe.reasons import SaveReason
from spotsafe.telemetry.report import Report
from spotsafe.telemetry.timeline import Timeline

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = ("png", "svg", "pdf")
COLOURS = {
    "spot": "#4c72b0",
    "on-demand": "#dd8452",
    None: "#8c8c8c",
    "interruption": "#c44e52",
    "notice": "#f0a30a",
    "checkpoint": "#55a868",
    "emergency": "#f0a30a",
    "restore": "#8172b3",
    "failure": "#c44e52",
    "gap": "#d9d9d9",
    "market": "#937860",
}


def plot_format(path: str | Path) -> str:
    """The image format a file name asks for (and a folder to write it in exists), or a clear error."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ConfigError(f"{path}: the plot's file name must end in .png, .svg or .pdf (got {suffix or 'none'!r})")
    if not Path(path).absolute().parent.is_dir():
        raise ConfigError(f"{path}: no folder {Path(path).parent} to write the plot in (create it first)")
    return suffix


def time_unit(seconds: float) -> tuple[str, float]:
    """The unit a span of ``seconds`` reads best in, and its length in seconds."""
    if seconds < 180:
        return "seconds", 1.0
    if seconds < 3 * 3600:
        return "minutes", 60.0
    return "hours", 3600.0


def headline(report: Report) -> str:
    """The report's figures in one line, for a title."""
    parts = [f"{report.state}, step {report.final_step if report.final_step is not None else '-'}"]
    parts.append(f"{report.attempts} attempt{'s' if report.attempts != 1 else ''}")
    parts.append(f"{report.interruptions} interruption{'s' if report.interruptions != 1 else ''}")
    if report.restarts:
        parts.append(f"resumed {report.resumed}/{report.restarts}")
    if report.goodput is not None:
        parts.append(f"goodput {report.goodput:.0%}")
    if report.cost is not None:
        money = f"${report.cost:.4f} spent"
        if report.on_demand_cost is not None:
            money += f" vs ${report.on_demand_cost:.4f} on demand"
        parts.append(money)
    return " · ".join(parts)


def plain(text: str) -> str:
    """``text`` as matplotlib must be given it to draw it as it is: ``$`` escaped (no math mode)."""
    return text.replace("$", r"\$")


def draw(timeline: Timeline, report: Report | None, out: str | Path | IO[bytes], fmt: str | None = None) -> None:
    """Draw the timeline into ``out`` (a path, or a binary file with ``fmt``)."""
    fmt = fmt or plot_format(str(out))
    figure(timeline, report).savefig(out, format=fmt, dpi=110)


def figure(timeline: Timeline, report: Report | None) -> Figure:
    """The timeline drawn on a matplotlib figure (not saved)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    t0 = timeline.start
    unit, scale = time_unit(timeline.duration)

    def m(time: float) -> float:
        return (time - t0) / scale

    fig = Figure(figsize=(11, 7.2), layout="constrained")
    lane, prog, cost = fig.subplots(3, 1, sharex=True, height_ratios=[1.1, 2.2, 1.4])
    title = f"spotsafe: {timeline.run}"
    fig.suptitle(plain(title + ("\n" + headline(report) if report is not None else "")), fontsize=11, x=0.01, ha="left")

    # Lane: attempts, gaps between them, and what happened on them.
    for gap in timeline.gaps:
        lane.broken_barh([(m(gap.start), m(gap.end) - m(gap.start))], (0.25, 0.5), color=COLOURS["gap"], hatch="//")
    for a in timeline.attempts:
        width = max(m(a.end) - m(a.start), 1e-3)
        colour = COLOURS.get(a.market, COLOURS[None])
        lane.broken_barh([(m(a.start), width)], (0.25, 0.5), color=colour, alpha=0.9 if not a.running else 0.6)
        if width > timeline.duration / scale * 0.12:
            lane.text(m(a.start) + width / 2, 0.5, plain(f"#{a.number}" + (f" {a.pool}" if a.pool else "")),
                      ha="center", va="center", fontsize=8, color="white", clip_on=True)  # fmt: skip
    _scatter(lane, [(m(x.time), 0.92) for x in timeline.notices], "v", COLOURS["notice"], 60)
    _scatter(lane, [(m(x.time), 0.5) for x in timeline.interruptions], "X", COLOURS["interruption"], 80)
    _scatter(lane, [(m(x.time), 1.05) for x in timeline.market], "|", COLOURS["market"], 80)
    regular = [x for x in timeline.checkpoints if x.kind != SaveReason.NOTICE]
    emergency = [x for x in timeline.checkpoints if x.kind == SaveReason.NOTICE]
    _scatter(lane, [(m(x.time), 0.1) for x in regular], "|", COLOURS["checkpoint"], 60)
    _scatter(lane, [(m(x.time), 0.1) for x in emergency], "D", COLOURS["emergency"], 25)
    _scatter(lane, [(m(x.time), 0.1) for x in timeline.failures], "x", COLOURS["failure"], 40)
    lane.set_ylim(-0.1, 1.2)
    lane.set_yticks([])
    lane.set_ylabel(plain("attempts"))
    handles: list[Any] = [
        Patch(color=COLOURS["spot"], label=plain("spot")),
        Patch(color=COLOURS["on-demand"], label=plain("on demand")),
        Patch(color=COLOURS["gap"], hatch="//", label=plain("launching, restarting, waiting")),
        Line2D([], [], ls="", marker="v", color=COLOURS["notice"], label=plain("notice")),
        Line2D([], [], ls="", marker="X", color=COLOURS["interruption"], label=plain("interruption")),
        Line2D([], [], ls="", marker="|", color=COLOURS["checkpoint"], label=plain("checkpoint")),
        Line2D([], [], ls="", marker="D", color=COLOURS["emergency"], label=plain("emergency checkpoint")),
    ]
    if timeline.market:
        handles.append(Line2D([], [], ls="", marker="|", color=COLOURS["market"], label=plain("market interruption")))
    lane.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.05), fontsize=7, frameon=False)

    # Progress: step over time per attempt, commits and restores.
    for a, series in zip(timeline.attempts, timeline.progress, strict=True):
        if series:
            colour = COLOURS.get(a.market, COLOURS[None])
            prog.plot([m(x) for x, _ in series], [s for _, s in series], color=colour, lw=1.6, drawstyle="steps-post")
    _scatter(prog, [(m(x.time), x.step or 0) for x in regular], "o", COLOURS["checkpoint"], 14)
    _scatter(prog, [(m(x.time), x.step or 0) for x in emergency], "D", COLOURS["emergency"], 22)
    _scatter(prog, [(m(x.time), x.step or 0) for x in timeline.restores], "o", COLOURS["restore"], 30, hollow=True)
    for x in timeline.interruptions:
        prog.axvline(m(x.time), color=COLOURS["interruption"], lw=0.8, ls=":")
    prog.set_ylabel(plain("training step"))
    prog.set_ylim(bottom=0)
    prog.legend(
        handles=[
            Line2D([], [], ls="", marker="o", color=COLOURS["checkpoint"], label=plain("committed")),
            Line2D([], [], ls="", marker="o", mfc="none", color=COLOURS["restore"], label=plain("restored")),
            Line2D([], [], ls=":", color=COLOURS["interruption"], label=plain("interruption")),
        ],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
        frameon=False,
    )

    # Cost: spent so far against the same progress on demand.
    if timeline.cost:
        cost.plot([m(x) for x, _ in timeline.cost], [c for _, c in timeline.cost], color=COLOURS["spot"],
                  label=plain("spent"))  # fmt: skip
    if timeline.on_demand:
        cost.plot([m(x) for x, _ in timeline.on_demand], [c for _, c in timeline.on_demand],
                  color=COLOURS["on-demand"], ls="--", label=plain("same progress on demand"))  # fmt: skip
    if timeline.cost or timeline.on_demand:
        cost.set_ylabel(plain("dollars"))
        cost.set_ylim(bottom=0)
        cost.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    else:
        cost.set_yticks([])
        cost.text(0.5, 0.5, plain("cost not recorded: run the job under spotsafe run (or give an on-demand price)"),
                  transform=cost.transAxes, ha="center", va="center", fontsize=9, color="#666666")  # fmt: skip
    cost.set_xlabel(plain(f"{unit} since the run's first event"))
    cost.set_xlim(0, max(timeline.duration / scale, 1e-3) * 1.01)
    for ax in (lane, prog, cost):
        ax.grid(axis="x", color="#eeeeee")
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def _scatter(
    ax: Any, points: list[tuple[float, float]], marker: str, colour: str, size: float, *, hollow: bool = False
) -> None:
    if not points:
        return
    xs, ys = zip(*points, strict=True)
    if hollow:
        ax.scatter(xs, ys, marker=marker, s=size, facecolors="none", edgecolors=colour, zorder=3)
    else:
        ax.scatter(xs, ys, marker=marker, s=size, color=colour, zorder=3)


def render(timeline: Timeline, report: Report | None, fmt: str = "svg") -> bytes:
    """The timeline as an image in memory."""
    buffer = io.BytesIO()
    draw(timeline, report, buffer, fmt)
    return buffer.getvalue()
