"""The quantize report as a picture: per-layer relative output error, GPTQ against RTN, block by block.

matplotlib (the ``report`` extra) is imported lazily, with the Agg backend (no display needed).
"""

from __future__ import annotations

import re
from pathlib import Path

FIGSIZE = (10.0, 4.0)  # inches
DPI = 100  # the PNG is FIGSIZE * DPI pixels: 1000 x 400
INSTALL_HINT = "pip install 'gptq-plugin[report]'"


def png_path(report_json: str | Path) -> Path:
    """Where the picture of the report at ``report_json`` goes: the same path with suffix ``.png`` (``x.png.png`` for ``x.png``,
    never the JSON itself)."""
    p = Path(report_json)
    return p.with_name(p.name + ".png") if p.suffix.lower() == ".png" else p.with_suffix(".png")


def _block(name: str) -> str:
    """The decoder block of a layer name: ``model.layers.3.self_attn.q_proj`` -> ``3``; else the name's prefix."""
    m = re.search(r"\.(\d+)\.", name)
    return m.group(1) if m else name.rpartition(".")[0]


def plot_report(report: dict, path: str | Path, title: str | None = None) -> Path | None:
    """Write a PNG (``FIGSIZE * DPI`` pixels) of the per-layer relative output error (``tr(ΔW H ΔWᵀ) /
    tr(W H Wᵀ)``, log scale) of GPTQ and of RTN on the same grid, layers in quantization order, grouped and
    labelled by decoder block.

    Args:
        report: :meth:`gptq_plugin.blockquant.QuantizeReport.to_dict`'s dict (``layers``: ``name``, ``rel_err``,
            ``rtn_rel_err``).
        path: the PNG to write.
        title: the figure's title (default: a generic one).

    Returns:
        ``path``, or None when no layer has a measured error (an RTN run measures none: it has no Hessian).

    Raises:
        ImportError: matplotlib is not installed (the message names the pip command).
    """
    layers = [l for l in report.get("layers", []) if l.get("rel_err") is not None and l.get("rtn_rel_err") is not None]
    if not layers:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(f"the report's plot needs matplotlib: {INSTALL_HINT}") from None
    x = list(range(len(layers)))
    blocks: list[tuple[str, int, int]] = []  # (block, first index, last index)
    for i, l in enumerate(layers):
        b = _block(l["name"])
        if blocks and blocks[-1][0] == b:
            blocks[-1] = (b, blocks[-1][1], i)
        else:
            blocks.append((b, i, i))
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    try:
        for j, (_, a, b) in enumerate(blocks):
            if j % 2:
                ax.axvspan(a - 0.5, b + 0.5, color="0.93", lw=0)
        ax.plot(x, [l["rtn_rel_err"] for l in layers], "s-", ms=3, lw=1, color="tab:orange", label="RTN")
        ax.plot(x, [l["rel_err"] for l in layers], "o-", ms=3, lw=1, color="tab:blue", label="GPTQ")
        ax.set_yscale("log")
        step = max(1, len(blocks) // 30)
        ax.set_xticks([(a + b) / 2 for _, a, b in blocks[::step]], [blk for blk, _, _ in blocks[::step]], fontsize=7)
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.set_xlabel("decoder block (shaded bands; its linear layers in quantization order)")
        ax.set_ylabel("relative output error")
        ax.set_title(title or "Per-layer relative output error on the calibration inputs: GPTQ vs RTN")
        ax.grid(True, which="major", axis="y", alpha=0.4)
        ax.legend(loc="upper left")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def write_report_plot(report: dict, report_json: str | Path, title: str | None = None) -> tuple[Path | None, str]:
    """Write :func:`png_path` of ``report_json`` with :func:`plot_report`; return ``(png or None, one line to
    print)``: where the picture is, why there is none (no measured error), or the pip command when matplotlib is
    missing (the JSON report is written regardless)."""
    png = png_path(report_json)
    try:
        done = plot_report(report, png, title)
    except ImportError:
        return None, f"warning: no plot of the report written: matplotlib is not installed ({INSTALL_HINT})"
    if done is None:
        return None, "no plot of the report: no layer has a measured error (RTN measures none)"
    return done, f"per-layer error plot (GPTQ vs RTN): {done}"
