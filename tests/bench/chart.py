"""The PNG beside BENCHMARKS.md: remem and nbdkit memory side by side at a glance.

Four panels: fio IOPS per workload and server (a red tick over remem k=2 marks the target,
as a fraction of nbdkit's bar); CPU per request; the kernel-swap hog's time per page-in order;
the distribution of page-in latencies. matplotlib comes with `make bench` (the bench extra),
so it is imported here only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .fio_rows import K1, K2, LABELS, NBDKIT

COLORS = {NBDKIT: "#8c8c8c", K1: "#9ecae1", K2: "#2171b5"}
SWAP_COLORS = {"nbdkit": "#8c8c8c", "remem": "#2171b5"}
# Targets drawn on the IOPS panel: workload -> least remem k=2 / nbdkit.
IOPS_TARGETS = {
    "randread 4k qd32": 0.5,
    "randwrite 4k qd32": 0.3,
    "read 1m qd8": 0.6,
    "write 1m qd8": 0.4,
}
CPU_TARGET_US = 40.0
SWAP_TARGET = 1.25


def render_chart(results: dict[str, Any], path: Path) -> None:
    """Draw the four panels into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(16, 10.5), dpi=100)
    fio = results.get("fio")
    rows = fio.get("rows", []) if isinstance(fio, dict) else []
    _iops_panel(axes[0][0], rows)
    _cpu_panel(axes[0][1], rows)
    swap = results.get("swap")
    if isinstance(swap, dict) and "orders" in swap:
        _swap_panel(axes[1][0], swap)
        _latency_panel(axes[1][1], swap)
    else:
        why = "not run" if swap is None else swap.get("skipped") or swap.get("error", "")
        for ax in axes[1]:
            ax.axis("off")
            ax.text(
                0.5,
                0.5,
                f"kernel swap: skipped ({why})",
                ha="center",
                va="center",
                fontsize=13,
                transform=ax.transAxes,
            )
    figure.suptitle(
        f"remem against nbdkit memory, one run ({results.get('date', '')}); "
        "higher IOPS and lower times are better",
        fontsize=14,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path)
    plt.close(figure)


def _grouped(ax: Any, rows: list[dict[str, Any]], field: str) -> list[float]:
    """Bars of `field` for nbdkit, k=1, k=2 per workload; returns the x of each group."""
    width = 0.27
    centers = [float(i) for i in range(len(rows))]
    for offset, name in zip((-width, 0.0, width), (NBDKIT, K1, K2), strict=True):
        values = [row["results"].get(name, {}).get(field, 0.0) for row in rows]
        ax.bar([c + offset for c in centers], values, width, label=LABELS[name], color=COLORS[name])
    ax.set_xticks(centers)
    ax.set_xticklabels([row["workload"] for row in rows], rotation=20, ha="right")
    ax.set_yscale("log")
    ax.grid(axis="y", which="both", alpha=0.3)
    # Head room above the tallest bar for the legend (a log axis: a factor, not a margin).
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * 6)
    return centers


def _legend(ax: Any) -> None:
    """One row above the bars, where the head room left by `_grouped` is."""
    ax.legend(fontsize=9, loc="upper center", ncol=4, frameon=False)


def _iops_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    ax.set_title("fio through NBD: IOPS (log scale); label = remem k=2 / nbdkit")
    if not rows:
        ax.axis("off")
        ax.text(0.5, 0.5, "fio: not run", ha="center", transform=ax.transAxes)
        return
    centers = _grouped(ax, rows, "iops")
    width = 0.27
    for center, row in zip(centers, rows, strict=True):
        base = row["results"][NBDKIT]["iops"]
        ours = row["results"].get(K2, {}).get("iops", 0.0)
        target = IOPS_TARGETS.get(row["workload"], 0.0)
        if base:
            # Above the bar or its target tick, whichever is higher, so neither hides it.
            ax.annotate(
                f"{ours / base:.2f}x",
                (center + width, max(ours, base * target)),
                ha="center",
                va="bottom",
                fontsize=9,
                xytext=(0, 2),
                textcoords="offset points",
            )
        if target and base:
            ax.hlines(
                base * target, center + width / 2, center + 1.5 * width, colors="red", linewidth=2.5
            )
    ax.plot([], [], color="red", linewidth=2.5, label="target for k=2")
    ax.set_ylabel("IOPS")
    _legend(ax)


def _cpu_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    ax.set_title("CPU per request, all of each server's processes (log scale)")
    if not rows:
        ax.axis("off")
        ax.text(0.5, 0.5, "fio: not run", ha="center", transform=ax.transAxes)
        return
    _grouped(ax, rows, "cpu_us_per_op")
    ax.axhline(
        CPU_TARGET_US,
        color="red",
        linestyle="--",
        linewidth=1.2,
        label=f"target, 4K QD32 at k=2: {CPU_TARGET_US:.0f} us",
    )
    ax.set_ylabel("CPU microseconds per request")
    _legend(ax)


def _swap_panel(ax: Any, swap: dict[str, Any]) -> None:
    ax.set_title(
        f"kernel swap: {swap['hog_mib']} MiB hog in {swap['limit_mib']} MiB, time "
        "(label = remem / nbdkit)"
    )
    orders = list(swap["orders"])
    width = 0.35
    for offset, name in zip((-width / 2, width / 2), ("nbdkit", "remem"), strict=True):
        values = [swap["orders"][o]["servers"][name]["total_s"] for o in orders]
        label = "nbdkit memory" if name == "nbdkit" else "remem k=2"
        bars = ax.bar(
            [i + offset for i in range(len(orders))],
            values,
            width,
            label=label,
            color=SWAP_COLORS[name],
        )
        if name == "remem":
            for bar, order in zip(bars, orders, strict=True):
                ax.annotate(
                    f"{swap['orders'][order]['ratio']:.2f}x",
                    (bar.get_x() + width / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    for i, order in enumerate(orders):
        base = swap["orders"][order]["servers"]["nbdkit"]["total_s"]
        ax.hlines(base * SWAP_TARGET, i, i + width, colors="red", linewidth=2.5)
    ax.plot([], [], color="red", linewidth=2.5, label=f"target: {SWAP_TARGET}x nbdkit")
    ax.set_xticks(range(len(orders)))
    ax.set_xticklabels([f"{o} page-in" for o in orders])
    ax.set_ylabel("seconds (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)


def _latency_panel(ax: Any, swap: dict[str, Any]) -> None:
    ax.set_title("kernel swap: page-in latency, each page's first touch (CDF)")
    quantiles = swap["quantiles"]
    styles = {"random": "-", "sequential": ":"}
    for order, figures in swap["orders"].items():
        for name in ("nbdkit", "remem"):
            label = f"{'nbdkit memory' if name == 'nbdkit' else 'remem k=2'}, {order}"
            ax.plot(
                figures["servers"][name]["quantiles_us"],
                quantiles,
                styles[order],
                color=SWAP_COLORS[name],
                label=label,
                linewidth=1.8,
            )
    ax.set_xscale("log")
    ax.set_xlabel("microseconds (log scale)")
    ax.set_ylabel("fraction of page touches")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
