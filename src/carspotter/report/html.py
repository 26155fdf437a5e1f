"""A tiny document model (sections of tables, images, paragraphs) rendered to Markdown and to ONE
self-contained HTML file: inline CSS, PNGs as base64 data URIs, no external asset, so the file can be mailed
or opened offline.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from carspotter.report.tables import DASH, Table


@dataclass
class Figure:
    filename: str  # written beside report.md, embedded in report.html
    png: bytes
    caption: str = ""


@dataclass
class Para:
    text: str
    kind: str = "p"  # p | warn | note


Block = Table | Figure | Para


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:24px auto;max-width:1500px;
 color:#1d232a;padding:0 16px;line-height:1.4}
h1{font-size:1.7em;margin-bottom:4px}h2{border-bottom:2px solid #dde3ea;padding-bottom:4px;margin-top:34px}
h3{margin:22px 0 6px}
table{border-collapse:collapse;margin:8px 0 4px;font-size:13px;width:100%}
th,td{border:1px solid #d4dbe3;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6;font-weight:600}tr:nth-child(even) td{background:#f8fafc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.missing{color:#98a2ad;text-align:center}
td.ref{background:#fff8e1 !important;text-align:right;white-space:nowrap}
.caption{color:#5b6672;font-size:12px;margin:2px 0 8px}
.note{color:#5b6672;font-size:12px;margin:2px 0}
.warn{background:#fff3cd;border-left:4px solid #e0a800;padding:8px 12px;margin:10px 0;font-size:14px}
.p{margin:6px 0}
figure{margin:12px 0;display:inline-block;vertical-align:top}
figure img{max-width:100%;border:1px solid #e3e8ee}
figcaption{font-size:12px;color:#5b6672}
"""


def _is_num(cell: str) -> bool:
    return cell[:1].isdigit() or (cell[:1] == "-" and cell[1:2].isdigit())


def table_html(t: Table, show_title: bool = True) -> str:
    ref_cols = {i for i, h in enumerate(t.headers) if h.lower().startswith("reference")}
    out = [f"<h3>{html.escape(t.title)}</h3>"] if show_title else []
    out.append(
        "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.headers) + "</tr></thead>"
    )
    out.append("<tbody>")
    for row in t.rows:
        tds = []
        for i, cell in enumerate(row):
            cls = (
                "missing" if cell == DASH else ("ref" if i in ref_cols else ("num" if _is_num(cell) else ""))
            )
            tds.append(
                f'<td class="{cls}">{html.escape(cell)}</td>' if cls else f"<td>{html.escape(cell)}</td>"
            )
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    if t.caption:
        out.append(f'<div class="caption">{html.escape(t.caption)}</div>')
    out += [f'<div class="note">Note: {html.escape(n)}</div>' for n in t.notes]
    return "\n".join(out)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(title: str, sections: list[Section], subtitle: str = "") -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        body.append(f'<div class="caption">{html.escape(subtitle)}</div>')
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Table):
                body.append(table_html(b, show_title=b.title != s.title))
            elif isinstance(b, Figure):
                cap = f"<figcaption>{html.escape(b.caption)}</figcaption>" if b.caption else ""
                body.append(
                    f'<figure><img alt="{html.escape(b.caption or b.filename)}" '
                    f'src="{_data_uri(b.png)}">{cap}</figure>'
                )
            else:
                body.append(f'<div class="{html.escape(b.kind)}">{html.escape(b.text)}</div>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table, show_title: bool = True) -> str:
    lines = ([f"### {t.title}", ""] if show_title else []) + [
        "| " + " | ".join(_md_cell(h) for h in t.headers) + " |",
        "|" + "|".join("---" for _ in t.headers) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.caption:
        lines += ["", f"_{t.caption}_"]
    lines += [""] + [f"> Note: {n}" for n in t.notes]
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(title: str, sections: list[Section], subtitle: str = "") -> str:
    out = [f"# {title}", ""]
    if subtitle:
        out += [f"_{subtitle}_", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out.append(table_markdown(b, show_title=b.title != s.title))
            elif isinstance(b, Figure):
                out += [f"![{b.caption or b.filename}]({b.filename})", ""]
            else:
                out += [f"> **Warning:** {b.text}" if b.kind == "warn" else b.text, ""]
    return "\n".join(out).rstrip() + "\n"
