"""Checks on drawn matplotlib figures shared by the plot tests."""

from __future__ import annotations


def artists_outside_canvas(figure) -> list[str]:
    """What reaches past the figure's canvas once drawn: each axes' title, the legends, and each axes with
    everything drawn on it (tick labels, axis labels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.draw_without_rendering()  # runs the layout engine, as saving does
    renderer = figure.canvas.get_renderer()  # pyright: ignore[reportAttributeAccessIssue]  # Agg's canvas
    canvas = figure.bbox
    boxes = [(f"legend {i}", legend.get_window_extent(renderer)) for i, legend in enumerate(figure.legends)]
    for ax in figure.axes:
        boxes += [(f"title {ax.get_title()!r}", ax.title.get_window_extent(renderer))]
        boxes += [(f"axes {ax.get_title()!r} with its labels", ax.get_tightbbox(renderer))]
    return [
        name
        for name, box in boxes
        if box is None
        or box.x0 < canvas.x0 - 0.5
        or box.y0 < canvas.y0 - 0.5
        or box.x1 > canvas.x1 + 0.5
        or box.y1 > canvas.y1 + 0.5
    ]
