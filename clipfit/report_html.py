"""report.html: report.md as one self-contained page, pictures embedded as base64.

Only the Markdown that clipfit.report writes is understood: headings, bullet lists, pipe
tables, images on a line of their own, inline `code`, and paragraphs.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)")
STYLE = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em}"
         "td.num{text-align:right;font-variant-numeric:tabular-nums}code{background:#f4f4f4;padding:0 .2em}"
         "img{max-width:100%}.wide{overflow-x:auto}")  # a sweep's table of many runs scrolls, not overflows


def inline(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def embedded_image(alt: str, src: str, folder: Path) -> str:
    path = folder / src
    if not path.is_file():
        return f"<p>[missing picture {html.escape(src)}]</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def table(lines: list[str]) -> str:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header, body = rows[0], [r for r in rows[2:]]
    aligns = ["num" if cell.endswith(":") else "" for cell in rows[1]] if len(rows) > 1 else []
    out = ['<div class="wide"><table><thead><tr>' + "".join(f"<th>{inline(c)}</th>" for c in header) + "</tr></thead><tbody>"]
    for row in body:
        cells = [f'<td class="{aligns[i]}">{inline(c)}</td>' if i < len(aligns) and aligns[i] else f"<td>{inline(c)}</td>"
                 for i, c in enumerate(row)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</tbody></table></div>"])


def markdown_to_html(markdown: str, folder: Path, title: str, extra_html: str = "") -> str:
    """The page; `extra_html` (already HTML, e.g. the gallery) goes at the end of the body."""
    lines, out, i = markdown.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(table(block))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        heading = re.match(r"(#{1,6}) (.*)", line)
        image = IMAGE.fullmatch(line.strip())
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif image:
            out.append(embedded_image(image["alt"], image["src"], folder))
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    body = "\n".join(out + [extra_html] if extra_html else out)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
