"""A line chart as a small standalone SVG: a sweep's plot, with no plotting library."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT, MARGIN = 640, 400, 60


def line_chart(title: str, x_label: str, y_label: str, points: list[tuple[float, float]]) -> str:
    """Points joined by a line, with labelled axes and the values at each point."""
    xs = [x for x, _ in points] or [0.0]
    ys = [y for _, y in points] or [0.0]
    x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_high = max(ys) * 1.1 or 1.0

    def place(x: float, y: float) -> tuple[float, float]:
        px = MARGIN + (x - x_low) / (x_high - x_low) * (WIDTH - 2 * MARGIN)
        py = HEIGHT - MARGIN - y / y_high * (HEIGHT - 2 * MARGIN)
        return round(px, 1), round(py, 1)

    placed = [place(x, y) for x, y in points]
    line = " ".join(f"{px},{py}" for px, py in placed)
    marks = "".join(
        f'<circle cx="{px}" cy="{py}" r="4"/><text x="{px}" y="{py - 10}" '
        f'text-anchor="middle">{y:g}</text><text x="{px}" y="{HEIGHT - MARGIN + 18}" '
        f'text-anchor="middle">{x:g}</text>'
        for (px, py), (x, y) in zip(placed, points, strict=True)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="12">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="14">{escape(title)}</text>'
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" '
        f'y2="{HEIGHT - MARGIN}" stroke="black"/>'
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>'
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 16}" text-anchor="middle">{escape(x_label)}</text>'
        f'<text x="16" y="{HEIGHT / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {HEIGHT / 2})">{escape(y_label)}</text>'
        f'<polyline points="{line}" fill="none" stroke="#3366cc" stroke-width="2"/>'
        f'<g fill="#3366cc">{marks}</g></svg>\n'
    )
