"""HTML and Markdown building blocks of the report: styles, the render-check script, tables, the page."""

from __future__ import annotations

import html
import re
from typing import Any, Iterable, Sequence

import matplotlib

from attnkit.eval.report_data import Row, macro_score
from attnkit.eval.report_plots import to_svg

Cell = Any  # str, number, None, or (text, n, css background) for a shaded score

CSS = """
:root { --fg:#1d2125; --muted:#5b6570; --line:#dde1e6; --card:#fff; --bg:#f5f6f8; --accent:#1f5fa8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); font:15px/1.5 "DejaVu Sans", system-ui, -apple-system,
       "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1240px; margin:0 auto; padding:28px 32px 60px; }
h1 { font-size:28px; margin:0 0 6px; }
h2 { font-size:21px; margin:40px 0 8px; padding-bottom:6px; border-bottom:2px solid var(--line); }
h3 { font-size:16px; margin:22px 0 8px; }
p.hint, p.empty { color:var(--muted); margin:4px 0 12px; max-width:1000px; }
p.empty { font-style:italic; }
nav { margin:14px 0 0; font-size:14px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; white-space:nowrap; }
figure.plot { background:var(--card); border:1px solid var(--line); border-radius:8px; margin:14px 0;
              padding:14px 16px 8px; box-shadow:0 1px 2px rgba(0,0,0,.04); overflow-x:auto; }
figure.plot svg, figure.plot img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { color:var(--muted); font-size:13.5px; margin-top:6px; }
table { border-collapse:collapse; background:var(--card); margin:8px 0 18px; font-size:13.5px;
        font-variant-numeric:tabular-nums; }
th, td { border:1px solid var(--line); padding:5px 10px; text-align:right; white-space:nowrap; }
th { background:#eef1f4; font-weight:600; white-space:normal; vertical-align:bottom; }
td:first-child, th:first-child, td.text, th.text { text-align:left; }
dl.meta { display:grid; grid-template-columns:repeat(auto-fill, minmax(270px, 1fr)); gap:8px 14px; margin:14px 0; }
dl.meta div { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:6px 10px; }
dl.meta dt { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
dl.meta dd { margin:0; font-size:14px; overflow-wrap:anywhere; }
.tables { overflow-x:auto; }
details { margin:6px 0 14px; }
summary { cursor:pointer; color:var(--accent); }
footer { color:var(--muted); font-size:13px; margin-top:40px; }
"""

EARLY_JS = """window.__reportErrors = [];
window.addEventListener('error', function (e) {
  var t = e.target && e.target.tagName ? ' <' + e.target.tagName.toLowerCase() + '> failed to load' : '';
  window.__reportErrors.push(String(e.message || e.type) + t);
}, true);
(function () { var ce = console.error; console.error = function () {
  window.__reportErrors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  return ce.apply(console, arguments); }; })();"""

CHECK_JS = """(function () {
  function check() {
    var figs = document.querySelectorAll('figure.plot'), ok = 0;
    for (var i = 0; i < figs.length; i++) {
      var g = figs[i].querySelector('svg, img'), r = g && g.getBoundingClientRect();
      var good = !!g && r.width > 0 && r.height > 0 && (g.tagName.toLowerCase() !== 'img' || g.naturalWidth > 0);
      figs[i].setAttribute('data-ok', good ? '1' : '0');
      if (good) ok++;
    }
    document.body.setAttribute('data-rendered', ok + '/' + figs.length);
    document.body.setAttribute('data-errors', window.__reportErrors.join(' | '));
    document.body.setAttribute('data-height', String(document.documentElement.scrollHeight));
  }
  check();
  window.addEventListener('load', check);
})();"""

def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _score_bg(score: float) -> str:
    """A light red-yellow-green background for a score in [0, 1]."""
    r, g, b, _ = matplotlib.colormaps["RdYlGn"](max(0.0, min(1.0, score)))
    mix = lambda c: int(255 * (0.55 + 0.45 * c))  # noqa: E731 - blended towards white, text stays readable
    return f"#{mix(r):02x}{mix(g):02x}{mix(b):02x}"


def score_cell(rows: list[Row]) -> Cell:
    """A mean score (%) shaded by its value, with n in the cell's tooltip."""
    s = macro_score(rows)
    return None if s is None else (f"{100 * s:.1f}", len(rows), _score_bg(s))


def n_range(groups: Iterable[list[Row]]) -> str:
    """"60", or "40–60" when the groups differ in size (empty groups ignored)."""
    ns = sorted({len(g) for g in groups if g})
    return "–" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


TEXT = ' class="text"'
_NUMERIC = re.compile(r"^[-+–]?[\d.,]+(?: \(n=\d+\))?$|^–$")


def html_table(header: Sequence[str], body: Iterable[Sequence[Cell]], cls: str = "") -> str:
    body = [list(row) for row in body]
    text_cols = [False] * len(header)
    out = []
    for row in body:
        cells = []
        for i, c in enumerate(row):
            if isinstance(c, tuple):
                text, n, bg = c
                cells.append(f'<td style="background:{bg}" title="n={esc(n)}">{esc(text)}</td>')
            else:
                text = "–" if c is None else str(c)
                is_text = c is not None and not _NUMERIC.match(text)
                text_cols[i] = text_cols[i] or (is_text and row is body[0])
                cells.append(f"<td{TEXT if is_text else ''}>{esc(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    heads = "".join(f"<th{TEXT if t else ''}>{esc(h).replace(' @ ', '<br>@ ')}</th>"
                    for h, t in zip(header, text_cols))
    return f'<table class="{esc(cls)}"><thead><tr>{heads}</tr></thead><tbody>' + "\n".join(out) + "</tbody></table>"


def md_esc(text: Any) -> str:
    """Text for Markdown: HTML-escaped (GitHub renders inline HTML), on one line, brackets and pipes escaped."""
    out = html.escape(str(text), quote=False).replace("\n", " ")
    return re.sub(r"([|\[\]`*])", r"\\\1", out)


def md_table(header: Sequence[str], body: Iterable[Sequence[Cell]]) -> str:
    def cell(c: Cell) -> str:
        return md_esc("–" if c is None else c[0] if isinstance(c, tuple) else c)

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


class Doc:
    """The report being built: HTML parts and Markdown parts side by side."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []
        self.n_plots = 0
        self.anchor = ""

    def heading(self, level: int, text: str, anchor: str | None = None) -> None:
        if anchor:
            self.anchor = anchor
        ident = f' id="{esc(anchor)}"' if anchor else ""
        self.html.append(f"<h{level}{ident}>{esc(text)}</h{level}>")
        self.md.append(f"{'#' * level} {md_esc(text)}\n")

    def para(self, text: str, cls: str = "hint", md: bool = True) -> None:
        self.html.append(f'<p class="{cls}">{esc(text)}</p>')
        if md:
            self.md.append((f"_{md_esc(text)}_" if cls == "empty" else md_esc(text)) + "\n")

    def figure(self, name: str, fig, caption: str) -> None:
        self.n_plots += 1
        svg = to_svg(fig, f"p{self.n_plots}")
        self.html.append(f'<figure class="plot" data-plot="{esc(name)}">{svg}'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
        self.md.append(f"Plot: [{md_esc(caption)}](report.html#{self.anchor})\n")

    def table(self, header: Sequence[str], body: list[Sequence[Cell]], title: str | None = None,
              collapsed: bool = False) -> None:
        table = f'<div class="tables">{html_table(header, body)}</div>'
        if collapsed and title:
            self.html.append(f"<details><summary>{esc(title)}</summary>{table}</details>")
        else:
            if title:
                self.html.append(f"<h3>{esc(title)}</h3>")
            self.html.append(table)
        self.md.append((f"**{md_esc(title)}**\n\n" if title else "") + md_table(header, body) + "\n")


def page(title: str, meta: list[tuple[str, str]], nav: list[tuple[str, str]], body: list[str], footer: str) -> str:
    """The whole self-contained HTML document."""
    items = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in meta)
    meta_html = f'<dl class="meta">{items}</dl>'
    nav_html = " ".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style><script>{EARLY_JS}</script></head>"
            f"<body><main><header><h1>attnkit evaluation report</h1>{meta_html}<nav>{nav_html}</nav></header>\n"
            + "\n".join(body)
            + f"\n<footer>{esc(footer)}</footer></main><script>{CHECK_JS}</script></body></html>\n")
