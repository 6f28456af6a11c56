"""Draws docs/scale-out.png, the scale-out topology of docs/operations.md ("Scaling out").

    python docs/figures/scale_out.py        (needs matplotlib: the train or dev extra)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "scale-out.png"
# Okabe-Ito colours: distinguishable with every common colour-vision deficiency.
BLUE, ORANGE, GREEN, GREY, SKY = "#0072B2", "#E69F00", "#009E73", "#999999", "#56B4E9"


def box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, colour: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", linewidth=1.5,
                                edgecolor=colour, facecolor=colour + "22"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], label: str = "",
          colour: str = GREY, style: str = "-|>") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour,
                                 linewidth=1.2))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center",
                fontsize=7.5, color="#333333")


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 6.2), dpi=110)
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 6.2)
    ax.axis("off")
    ax.set_title("opacityd scaled out: N receivers and N GPU workers on one PostgreSQL queue",
                 fontsize=11)
    box(ax, 0.2, 4.6, 1.9, 0.8, "modalities,\nPACS (push)", GREY)
    box(ax, 0.2, 1.2, 1.9, 0.8, "PACS / RIS\n(SR, HL7 results)", GREY)
    for i, y in enumerate((4.6, 3.3)):
        box(ax, 3.0, y, 2.3, 0.9, f"receiver host {i + 1}\nopacityd-receiver@{i + 1}\n"
            "serve: SCP, scheduler, sender", BLUE)
        arrow(ax, (2.1, 5.0), (3.0, y + 0.45), "C-STORE" if i == 0 else "")
        arrow(ax, (3.0, y + 0.2), (2.1, 1.7), "SR, ORU^R01" if i == 1 else "", ORANGE)
    box(ax, 6.3, 4.3, 2.0, 1.1, "PostgreSQL 15\nqueue + state\n(rows, leases, audit)", GREEN)
    box(ax, 6.3, 2.2, 2.0, 1.1, "shared spool\n(NFS, hard, server\nexport sync)", SKY)
    for i, y in enumerate((4.4, 2.9, 1.4)):
        box(ax, 9.0, y, 1.8, 0.9, f"GPU host {i + 1}\nopacityd-gpu-\nworker@0", ORANGE)
        arrow(ax, (9.0, y + 0.6), (8.3, 4.85), "claim SKIP LOCKED,\nlease" if i == 0 else "",
              GREEN, "<|-|>")
        arrow(ax, (9.0, y + 0.3), (8.3, 2.75), "read images,\nwrite SR" if i == 2 else "", SKY, "<|-|>")
    for y in (4.6, 3.3):
        arrow(ax, (5.3, y + 0.6), (6.3, 4.85), "", GREEN, "<|-|>")
        arrow(ax, (5.3, y + 0.3), (6.3, 2.75), "", SKY, "<|-|>")
    ax.text(5.8, 5.75, "row committed + file fsynced before C-STORE success", fontsize=8,
            ha="center", color=BLUE)
    ax.text(5.5, 0.45, "one database URL and one spool mount for every process; "
            "each process: at most 20 connections (8 pooled + 12 overflow)", fontsize=8,
            ha="center", color="#333333")
    fig.tight_layout()
    fig.savefig(OUT)
    print(OUT)


if __name__ == "__main__":
    main()
