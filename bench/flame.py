"""A flame graph (SVG) from py-spy's collapsed stacks, without Perl or a browser.

py-spy writes one format per recording; the bench records ``--format raw`` (collapsed stacks,
which the CPU breakdown needs) and draws the SVG here. Frames are merged by function and file
(line numbers dropped), the root at the bottom, widths in proportion to samples; each box has
a tooltip (``<title>``) with its samples and share, and is coloured by the component
``bench.attribution`` files its module under, so the table and the picture agree.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench import attribution

WIDTH = 1200
ROW = 16
FONT = 11
MIN_WIDTH_PX = 0.3  # narrower boxes are not drawn (invisible anyway); their parents still are
COLOURS = {
    attribution.SQS_KMS: "#e69f00",
    attribution.DYNAMODB: "#d55e00",
    attribution.SECRETS: "#cc79a7",
    attribution.HTTP_CLIENT: "#56b4e9",
    attribution.HTTP_SERVER: "#0072b2",
    attribution.JSON: "#f0e442",
    attribution.SCHEMA: "#bcbd22",
    attribution.CRYPTO: "#009e73",
    attribution.LOGGING: "#8c564b",
    attribution.METRICS: "#9467bd",
    attribution.EVENT_LOOP: "#bbbbbb",
    attribution.COURIER: "#ff6b6b",
}
DEFAULT_COLOUR = "#dddddd"


@dataclass
class _Node:
    name: str
    samples: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def _tree(stacks: Iterable[tuple[Sequence[str], int]]) -> _Node:
    root = _Node("all")
    for frames, count in stacks:
        root.samples += count
        node = root
        for frame in frames:
            function, file = attribution.parse_frame(frame)
            name = f"{function} ({file})" if file else function
            node = node.children.setdefault(name, _Node(name))
            node.samples += count
    return root


def _depth(node: _Node) -> int:
    return 1 + max((_depth(child) for child in node.children.values()), default=0)


def _colour(name: str) -> str:
    function, file = attribution.parse_frame(name)
    component = attribution.frame_component(function, file)  # the same rules as the table
    if component == "botocore":
        return COLOURS[attribution.SQS_KMS]
    if component == "aiohttp":
        return COLOURS[attribution.HTTP_SERVER]
    return COLOURS.get(component or "", DEFAULT_COLOUR)


def render(stacks: Iterable[tuple[Sequence[str], int]], title: str) -> str:
    """The SVG document of ``stacks`` (from ``attribution.parse_collapsed``)."""
    root = _tree(stacks)
    depth = _depth(root)
    height = (depth + 2) * ROW + 10
    total = max(1, root.samples)
    scale = (WIDTH - 20) / total
    boxes: list[str] = []

    def draw(node: _Node, x: float, level: int) -> None:
        width = node.samples * scale
        if width < MIN_WIDTH_PX:
            return
        y = height - (level + 1) * ROW - 4
        label = html.escape(node.name)
        share = 100 * node.samples / total
        text = ""
        if width > 3 * FONT:
            chars = int(width / (FONT * 0.6))
            shown = node.name if len(node.name) <= chars else node.name[: max(0, chars - 2)] + ".."
            text = f'<text x="{x + 3:.1f}" y="{y + ROW - 4}">{html.escape(shown)}</text>'
        boxes.append(
            f"<g><title>{label}: {node.samples} samples ({share:.1f}%)</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{ROW - 1}" '
            f'fill="{_colour(node.name) if level else "#eeeeee"}" rx="2"/>{text}</g>'
        )
        child_x = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            draw(child, child_x, level + 1)
            child_x += child.samples * scale

    draw(root, 10, 0)
    legend = " · ".join(
        f'<tspan fill="{colour}">■</tspan> {html.escape(name)}' for name, colour in COLOURS.items()
    )
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height + 2 * ROW}" '
            f'font-family="monospace" font-size="{FONT}">',
            '<rect width="100%" height="100%" fill="white"/>',
            f'<text x="10" y="{ROW}" font-size="{FONT + 3}">{html.escape(title)} '
            f"({root.samples} samples; hover a box for its share)</text>",
            f'<text x="10" y="{2 * ROW}" font-size="{FONT - 1}">{legend}</text>',
            f'<g transform="translate(0,{2 * ROW})">',
            *boxes,
            "</g>",
            "</svg>",
            "",
        ]
    )
