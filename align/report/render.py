"""The report as blocks, written as Markdown and as self-contained HTML (images embedded)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The plots' directory in the run, beside report.md.
PLOTS = "plots"


@dataclass
class Report:
    """The report as blocks (``("h2", text)``, ``("p", text)``, ``("img", file, alt)`` …), rendered
    to Markdown and to self-contained HTML."""

    blocks: list[tuple[str, ...]] = field(default_factory=list)

    def add(self, kind: str, *parts: str) -> None:
        self.blocks.append((kind, *parts))

    def markdown(self) -> str:
        out = []
        for kind, *parts in self.blocks:
            if kind in ("h1", "h2", "h3"):
                out.append(f"{'#' * int(kind[1])} {parts[0]}")
            elif kind == "p":
                out.append(parts[0])
            elif kind == "pre":
                out.append(f"```\n{parts[0]}\n```")
            elif kind == "img":
                out.append(f"![{parts[1]}]({PLOTS}/{parts[0]})")
            elif kind == "list":
                out.append("\n".join(f"- {item}" for item in parts))
            elif kind == "quote":
                out.append(
                    f"{parts[0]}\n\n"
                    + "\n".join(f"> {line}" for line in (parts[1] or "(empty)").splitlines())
                )
            elif kind == "table":
                rows = [row.split("\t") for row in parts]
                lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
                lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
                out.append("\n".join(lines))
        return "\n\n".join(out) + "\n"

    def html(self, plots: Path, title: str) -> str:
        esc = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(title)}</title>",
            # The metrics block wraps instead of scrolling sideways (a scroll bar hid its rollback
            # line); plots take the page's width.
            "<style>body{font-family:sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem}"
            "img{display:block;width:100%;height:auto}"
            "pre{background:#f4f4f4;padding:.5rem;font-size:.8rem;white-space:pre-wrap;overflow-wrap:anywhere}"
            "blockquote{border-left:3px solid #ccc;margin:0 0 1rem;padding-left:.75rem;white-space:pre-wrap}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}"
            "</style></head><body>",
        ]
        for kind, *parts in self.blocks:
            if kind in ("h1", "h2", "h3"):
                out.append(f"<{kind}>{esc(parts[0])}</{kind}>")
            elif kind == "p":
                out.append(f"<p>{esc(parts[0])}</p>")
            elif kind == "pre":
                out.append(f"<pre>{esc(parts[0])}</pre>")
            elif kind == "img":
                data = base64.b64encode((plots / parts[0]).read_bytes()).decode("ascii")
                out.append(f'<p><img alt="{esc(parts[1])}" src="data:image/png;base64,{data}"></p>')
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in parts) + "</ul>")
            elif kind == "quote":
                out.append(f"<p>{esc(parts[0])}</p><blockquote>{esc(parts[1] or '(empty)')}</blockquote>")
            elif kind == "table":
                rows = [row.split("\t") for row in parts]
                head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
                body = "".join(
                    "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows[1:]
                )
                out.append(f"<table><tr>{head}</tr>{body}</table>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def table_cell(text: Any) -> str:
    """``text`` as one table cell: one line, no column separators."""
    return " ".join(str(text).split()).replace("|", "/").replace("\t", " ")


def flagged(title: str, answer: str) -> str:
    """A sample's heading, with a word when the answer loops (as the style evaluator counts it)."""
    from align.tools.sampling import repetition_note

    note = repetition_note(answer)
    return f"{title} ({note}):" if note else f"{title}:"
