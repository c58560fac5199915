"""``RUN/report/index.html``: one static page that works offline.

No external scripts, CSS or fonts: one local script, ``viewer.js`` (:mod:`cancernet_batch.report_view`),
makes each map zoomable (the static PNG stays beside it); images, files and map data are referenced by
relative paths inside ``RUN/report/``; every text that comes from data (ids, paths, patient ids, messages) is escaped.
The page carries no timestamp, so re-running the report on the same run gives the same page.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from . import __version__
from .aggregate import REPORTED
from .atomic import write_text
from .errors import printable
from .runfolder import FAILURES_CSV, INPUTS_CSV, PATIENTS_CSV, VIEWER_JS

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fff3f0}.note{color:#a33}
figure{display:inline-block;margin:.5em;vertical-align:top;max-width:760px}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em}
div.zoom canvas{width:100%;border:1px solid #ddd;cursor:crosshair;touch-action:none}
div.zoom .bar{font-size:.85em;margin:.2em 0}div.zoom .bar button{min-width:2em;margin-right:.2em}
div.zoom .readout{font-variant-numeric:tabular-nums}div.zoom .regions{font-size:.85em}
"""
_VIEW_W, _VIEW_H = 760, 520  # canvas pixels of a zoomable map


def _e(value: object) -> str:
    return escape("" if value is None else printable(value), quote=True)


def _href(rel: str) -> str:
    """A relative link inside the report folder (names are already safe; quoting is belt and braces)."""
    return _e(quote(rel, safe="/._-"))


def _num(value: object, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _table(header: list[str], rows: list[list[tuple[str, bool]]], bad: list[bool] | None = None) -> str:
    """An HTML table; each cell is ``(already escaped text, numeric)``."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="bad"' if bad and bad[i] else ""
        cells = "".join(f'<td class="n">{t}</td>' if n else f"<td>{t}</td>" for t, n in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figures_cells(f) -> list[tuple[str, bool]]:
    return [(_num(f.tissue_tiles, "d"), True), (_num(f.idc_tiles, "d"), True), (_num(f.idc_fraction, ".1%"), True),
            (_num(f.idc_area_mm2, ".3f"), True), (_num(f.mean_prob, ".3f"), True), (_num(f.max_prob, ".3f"), True),
            (_num(f.idc_regions, "d"), True), (_num(f.largest_region_mm2, ".3f"), True)]


_FIG_HEAD = ["tissue tiles", "IDC tiles", "IDC fraction", "IDC area mm²", "mean p", "max p", "IDC regions",
             "largest region mm²"]


def _inputs_table(summary) -> str:
    rows, bad = [], []
    for r in summary.inputs:
        f = r.figures
        link = f'<a href="#{_e(f.input_id)}">{_e(f.input_id)}</a>' if r.heatmap else _e(f.input_id)
        status = _e(f.status) + (f' <span class="note">({_e(f.note)})</span>' if f.note else "")
        rows.append([(link, False), (_e(f.patient), False), (status, False), *_figures_cells(f),
                     (_e(f.source), False)])
        bad.append(f.status != REPORTED)
    return _table(["input", "patient", "status", *_FIG_HEAD, "source"], rows, bad)


def _patients_table(summary) -> str:
    rows = [[(_e(p.patient), False), (str(p.inputs), True), (str(p.inputs_not_reported), True),
             *_figures_cells(p)] for p in summary.patients]
    return _table(["patient", "inputs reported", "not reported", *_FIG_HEAD], rows,
                  [p.inputs_not_reported > 0 for p in summary.patients])


def _failures_table(summary) -> str:
    if not summary.failures:
        return "<p>No failures.</p>"
    rows = [[(_e(f.input), False), (_e(f.stage), False), (_e(f.error_class), False), (_e(f.message), False)]
            for f in summary.failures]
    return _table(["input", "stage", "error", "message"], rows)


def _maps(summary) -> str:
    parts = []
    for r in summary.inputs:
        if not r.heatmap:
            continue
        f = r.figures
        caption = (f"patient {_e(f.patient)} · {_e(f.input_id)} · IDC {_num(f.idc_fraction, '.1%')} of "
                   f"{_num(f.tissue_tiles, 'd')} tiles, {_num(f.idc_area_mm2, '.3f')} mm² · drawn over "
                   f"{_e(r.thumbnail)} · <a href=\"{_href(r.geojson)}\">GeoJSON</a>"
                   + (f" · <a href=\"{_href(r.regions)}\">regions</a>" if r.regions else ""))
        img = f'<img src="{_href(r.heatmap)}" alt="IDC heatmap of {_e(f.input_id)}">'
        if r.view:
            img = (f'<div class="zoom" data-id="{_e(f.input_id)}" data-view="{_href(r.view)}">'
                   '<div class="bar"><button type="button" data-zoom="1.5" title="zoom in">+</button>'
                   '<button type="button" data-zoom="0.6667" title="zoom out">&minus;</button>'
                   '<button type="button" data-zoom="fit">fit</button> '
                   '<span class="readout">wheel: zoom · drag: pan · click: pin a tile</span></div>'
                   f'<canvas width="{_VIEW_W}" height="{_VIEW_H}"></canvas>'
                   '<div class="regions"></div></div>'
                   f'<details><summary>static heatmap</summary>{img}</details>')
        parts.append(f'<figure id="{_e(f.input_id)}">{img}<figcaption>{caption}</figcaption></figure>')
    return "\n".join(parts) or "<p>No input is fully scored yet.</p>"


def render_index(summary) -> str:
    """The page as a string (see the module doc)."""
    thr = summary.threshold
    source = f'<span class="note">{_e(thr.source)}</span>' if thr.is_default else _e(thr.source)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cancernet report: {_e(summary.out.parent.name)}</title>
<style>{_CSS}</style></head><body>
<h1>IDC report: {_e(summary.out.parent.name)}</h1>
<p>{summary.reported} inputs reported, {summary.not_scored} not scored, {summary.failed} failed.
Decision threshold {thr.value:.3f} from {source}: a tile is IDC when P(IDC) &ge; the threshold.
Areas: tiles &times; (50 &times; target µm/px / 1000)² mm².
Files: <a href="{INPUTS_CSV}">{INPUTS_CSV}</a>, <a href="{PATIENTS_CSV}">{PATIENTS_CSV}</a>,
<a href="{FAILURES_CSV}">{FAILURES_CSV}</a>.</p>
<h2>Patients</h2>
{_patients_table(summary)}
<h2>Inputs</h2>
{_inputs_table(summary)}
<h2>Failures</h2>
{_failures_table(summary)}
<h2>Maps</h2>
{_maps(summary)}
<p style="color:#888;font-size:.8em">cancernet-batch {_e(__version__)}</p>
<script src="{VIEWER_JS}"></script>
</body></html>
"""


def write_index(summary) -> None:
    write_text(summary.index, render_index(summary))
