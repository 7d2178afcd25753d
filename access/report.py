"""The access audit for people and machines: tables, JSON, a CSV matrix and an SVG heat map.

Why: reviewers read a matrix faster than a table, and CI jobs want fields, not prose. Tables
follow kubectl's layout (upper-case headers, two-space gutters, no borders); JSON uses the
field names of ``access.model.Row`` and ``Finding``; the matrix has one row per workload and
one column per ExternalService, in CSV for spreadsheets and as an SVG any browser opens. The SVG
is written by hand (no plotting dependency), every text escaped as XML.

Pure: strings in and out, no files and no cluster.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from access.model import Audit, Finding, Row, WorkloadAccess, WorkloadKey
from core import constants as c

# -- tables -------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A kubectl-style table: left-aligned columns, two spaces apart, no trailing blanks."""
    body = [list(r) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
        for line in [list(headers), *body]
    ]
    return "\n".join(lines)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def policy_text(row: Row) -> str:
    """What the NetworkPolicies say about the path through the gateway."""
    if row.policy_allows:
        return "allowed"
    if not row.egress_allows and not row.ingress_allows:
        return "denied"
    return "egress-denied" if not row.egress_allows else "ingress-denied"


def reachable_text(row: Row) -> str:
    if row.reachable and row.pods_reachable < row.pods:
        return f"partial {row.pods_reachable}/{row.pods}"
    return _yes(row.reachable)


def _workload(row: Row | WorkloadAccess) -> str:
    return f"{row.kind}/{row.name}"


def rows_table(rows: Sequence[Row], *, show_service: bool = True) -> str:
    headers = ["NAMESPACE", "WORKLOAD", "PODS"]
    headers += ["EXTERNAL-SERVICE"] if show_service else []
    headers += ["PORT", "GRANT", "POLICY", "REACHABLE", "DIRECT"]
    lines = []
    for r in rows:
        line = [r.namespace, _workload(r), str(r.pods)]
        line += [r.external_service] if show_service else []
        line += [
            f"{r.port}/{r.protocol}",
            r.grant_form or "-",
            policy_text(r),
            reachable_text(r),
            _yes(r.direct),
        ]
        lines.append(line)
    return table(headers, lines)


def workloads_table(workloads: Sequence[WorkloadAccess]) -> str:
    return table(
        ["NAMESPACE", "WORKLOAD", "PODS", "EGRESS-POLICIES", "GRANTS", "INTERNET"],
        [
            [
                w.namespace,
                _workload(w),
                str(w.pods),
                ",".join(w.egress_policies) or "<none>",
                ",".join(w.grants) or "-",
                _yes(w.direct_egress),
            ]
            for w in workloads
        ],
    )


def findings_text(findings: Sequence[Finding]) -> str:
    if not findings:
        return "No findings."
    width = max(len(f.severity) for f in findings)
    code_width = max(len(f.code) for f in findings)
    lines = [f"Findings ({len(findings)}):"]
    for f in findings:
        lines.append(
            f"  {f.severity.ljust(width)}  {f.code.ljust(code_width)}  {f.subject}: {f.message}"
        )
    return "\n".join(lines)


# -- views --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class View:
    """The part of an audit one command shows."""

    title: str
    rows: tuple[Row, ...]
    findings: tuple[Finding, ...]
    workloads: tuple[WorkloadAccess, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "findings": [f.to_dict() for f in self.findings],
            "workloads": [w.to_dict() for w in self.workloads],
        }


def service_view(audit: Audit, name: str) -> View:
    """Everything about one ExternalService: who reaches it, how, and what is wrong."""
    rows = tuple(r for r in audit.rows if r.external_service == name)
    keys = {r.workload for r in rows}
    findings = tuple(f for f in audit.findings if f.external_service == name)
    workloads = tuple(w for w in audit.workloads if w.key in keys)
    info = next((es for es in audit.snapshot.external_services if es.name == name), None)
    if info is None:
        title = f"ExternalService {name}: not found"
    else:
        ports = ",".join(f"{p}/{proto}" for p, proto in info.ports) or "no valid ports"
        service = next((s for s in audit.snapshot.services if s.name == name), None)
        pods = sum(1 for p in audit.snapshot.gateway_pods if p.labels.get(c.LABEL_GATEWAY) == name)
        where = (
            f"gateway Service {audit.snapshot.gateway_namespace}/{name}, {pods} pod(s)"
            if service is not None
            else "no gateway Service"
        )
        title = f"ExternalService {name} ({info.dns_name or '?'}): {ports}; {where}"
    return View(title, rows, findings, workloads)


def workload_view(audit: Audit, namespace: str, kind: str = "", name: str = "") -> View:
    """Everything one workload (or every workload of a namespace) can reach."""

    def mine(key: WorkloadKey) -> bool:
        return key.namespace == namespace and (not kind or (key.kind, key.name) == (kind, name))

    rows = tuple(r for r in audit.rows if mine(r.workload))
    workloads = tuple(w for w in audit.workloads if mine(w.key))
    label = f"{kind}/{name}" if kind else ""
    findings = tuple(
        f
        for f in audit.findings
        if f.namespace == namespace and (not kind or f.workload in ("", label))
    )
    what = f"{namespace}/{label}" if kind else f"namespace {namespace}"
    return View(f"Access from {what}", rows, findings, workloads)


def all_view(audit: Audit) -> View:
    return View(
        f"Access in the cluster: {len(audit.workloads)} workload(s), "
        f"{len(audit.external_services)} ExternalService(s)",
        tuple(audit.rows),
        tuple(audit.findings),
        tuple(audit.workloads),
    )


def render_view(view: View, *, show_service: bool = True, show_workloads: bool = False) -> str:
    parts = [view.title, ""]
    if show_workloads:
        parts += [workloads_table(view.workloads) if view.workloads else "No workloads.", ""]
    if view.rows:
        parts.append(rows_table(view.rows, show_service=show_service))
    else:
        parts.append("No workload is granted or can reach a gateway here.")
    parts += ["", findings_text(view.findings)]
    return "\n".join(parts) + "\n"


# -- the matrix ---------------------------------------------------------------------------------

REACHABLE = "reachable"  # granted, and every granted port reachable from every pod
PARTIAL = "partial"  # granted, reachable on some ports or from some pods
BLOCKED = "blocked"  # granted, reachable on none
UNGRANTED = "ungranted"  # reachable without a grant
NONE = ""
STATES = (REACHABLE, PARTIAL, BLOCKED, UNGRANTED)


@dataclass(frozen=True, slots=True)
class Cell:
    state: str
    ports: str  # the ports the state is about, "443/TCP,22/TCP"
    direct: bool  # the destination is also reachable without the gateway

    @property
    def text(self) -> str:
        """The CSV value: the state, with ``+direct`` when the gateway can be bypassed."""
        if not self.state:
            return ""
        return self.state + ("+direct" if self.direct else "")


EMPTY = Cell(NONE, "", False)


@dataclass(frozen=True, slots=True)
class Matrix:
    external_services: tuple[str, ...]
    workloads: tuple[WorkloadAccess, ...]
    cells: dict[tuple[WorkloadKey, str], Cell]

    def cell(self, workload: WorkloadKey, external_service: str) -> Cell:
        return self.cells.get((workload, external_service), EMPTY)


def _cell(rows: Sequence[Row]) -> Cell:
    granted = [r for r in rows if r.granted]
    reached = [r for r in rows if r.reachable]
    direct = any(r.direct for r in rows)
    if not granted:
        if not reached:
            return EMPTY
        return Cell(UNGRANTED, _port_list(reached), direct)
    full = [r for r in granted if r.reachable and r.pods_reachable == r.pods]
    if len(full) == len(granted):
        return Cell(REACHABLE, _port_list(granted), direct)
    if not any(r.reachable for r in granted):
        return Cell(BLOCKED, _port_list(granted), direct)
    return Cell(PARTIAL, _port_list([r for r in granted if r.reachable]), direct)


def _port_list(rows: Iterable[Row]) -> str:
    return ",".join(f"{r.port}/{r.protocol}" for r in rows)


def matrix(audit: Audit) -> Matrix:
    grouped: dict[tuple[WorkloadKey, str], list[Row]] = {}
    for row in audit.rows:
        grouped.setdefault((row.workload, row.external_service), []).append(row)
    cells = {key: _cell(rows) for key, rows in grouped.items()}
    return Matrix(
        tuple(audit.external_services),
        tuple(sorted(audit.workloads, key=lambda w: w.key)),
        {k: v for k, v in cells.items() if v.state},
    )


def matrix_csv(m: Matrix) -> str:
    """One line per workload: namespace, kind, workload, pods, direct_internet, then one column
    per ExternalService holding the cell's state (``reachable``, ``partial``, ``blocked``,
    ``ungranted``, empty), suffixed ``+direct`` when the destination is reachable directly."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["namespace", "kind", "workload", "pods", "direct_internet", *m.external_services]
    )
    for w in m.workloads:
        writer.writerow(
            [
                w.namespace,
                w.kind,
                w.name,
                w.pods,
                _yes(w.direct_egress),
                *(m.cell(w.key, es).text for es in m.external_services),
            ]
        )
    return out.getvalue()


# Colour-blind-safe-ish, and each state also has a distinct mark for greyscale printing.
COLOURS = {
    REACHABLE: "#1a9850",
    PARTIAL: "#fee08b",
    BLOCKED: "#d73027",
    UNGRANTED: "#762a83",
    NONE: "#f2f2f2",
}
MARKS = {REACHABLE: "", PARTIAL: "~", BLOCKED: "x", UNGRANTED: "!", NONE: ""}
INTERNET_YES = "#f46d43"
INTERNET_NO = "#d9d9d9"
DESCRIPTIONS = {
    REACHABLE: "granted and reachable",
    PARTIAL: "granted, reachable on some ports or from some pods",
    BLOCKED: "granted but blocked by NetworkPolicy (or no gateway)",
    UNGRANTED: "reachable without a grant",
    NONE: "no access",
}

_CELL = 18
_GAP = 8  # between the internet column and the ExternalServices
_CHAR = 7.2  # average advance of the 12 px sans-serif font, for layout only
_PAD = 10


def matrix_svg(m: Matrix, title: str = "") -> str:
    """The matrix as an SVG heat map: rows are workloads (grouped by namespace), columns the
    ExternalServices, plus an "internet" column for direct egress; hover a cell for details.

    Each cell with access is a ``rect`` whose class is its state and whose ``data-workload``
    and ``data-external-service`` attributes name it; cells without access are background."""
    labels = [f"{w.namespace}/{w.kind}/{w.name}" for w in m.workloads]
    columns = ["internet (direct)", *m.external_services]
    left = _PAD + int(max([len(s) for s in labels] + [12]) * _CHAR) + _PAD
    top = 40 + int(max(len(s) for s in columns) * _CHAR * 0.72) + _PAD
    grid_w = len(columns) * _CELL + _GAP
    grid_h = len(labels) * _CELL
    legend_top = top + grid_h + 24
    width = max(left + grid_w + _PAD + 40, 640)
    height = legend_top + (len(DESCRIPTIONS) + 3) * 20 + _PAD
    heading = title or (
        f"Egress access: {len(m.workloads)} workload(s) x {len(m.external_services)} "
        "ExternalService(s)"
    )
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(heading)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{_PAD}" y="22" font-size="15" font-weight="bold">{escape(heading)}</text>',
    ]
    # Cells without access are the background (a pattern of empty cells), so the file grows
    # with the accesses, not with workloads x ExternalServices.
    es_left = _column_x(left, 1)
    if m.workloads and m.external_services:
        out += [
            f'<defs><pattern id="empty" x="{es_left}" y="{top}" width="{_CELL}" '
            f'height="{_CELL}" patternUnits="userSpaceOnUse"><rect width="{_CELL}" '
            f'height="{_CELL}" fill="{COLOURS[NONE]}" stroke="#ffffff" stroke-width="1"/>'
            "</pattern></defs>",
            f'<rect x="{es_left}" y="{top}" width="{left + grid_w - es_left}" '
            f'height="{grid_h}" fill="url(#empty)"><title>no access</title></rect>',
        ]
    for j, column in enumerate(columns):
        x = _column_x(left, j) + _CELL // 2
        y = top - 6
        out.append(
            f'<text x="{x}" y="{y}" transform="rotate(-45 {x} {y})" '
            f'class="column">{escape(column)}</text>'
        )
    previous = None
    for i, (w, label) in enumerate(zip(m.workloads, labels, strict=True)):
        y = top + i * _CELL
        if previous is not None and w.namespace != previous:
            out.append(
                f'<line x1="{_PAD}" y1="{y}" x2="{left + grid_w}" y2="{y}" '
                'stroke="#555555" stroke-width="1"/>'
            )
        previous = w.namespace
        out.append(
            f'<text x="{left - 6}" y="{y + _CELL - 5}" text-anchor="end" '
            f'class="row">{escape(label)}</text>'
        )
        internet = "yes" if w.direct_egress else "no"
        out.append(
            _rect(
                left,
                y,
                INTERNET_YES if w.direct_egress else INTERNET_NO,
                f"{label}: direct internet egress: {internet}",
                f"internet {internet}",
                {"data-workload": label},
            )
        )
        for j, es in enumerate(m.external_services, start=1):
            cell = m.cell(w.key, es)
            if not cell.state:
                continue
            x = _column_x(left, j)
            detail = DESCRIPTIONS[cell.state]
            if cell.ports:
                detail += f" ({cell.ports})"
            if cell.direct:
                detail += "; also reachable directly (gateway bypassable)"
            out.append(
                _rect(
                    x,
                    y,
                    COLOURS[cell.state],
                    f"{label} -> {es}: {detail}",
                    cell.state,
                    {"data-workload": label, "data-external-service": es},
                )
            )
            mark = MARKS[cell.state]
            if mark:
                colour = "#000000" if cell.state == PARTIAL else "#ffffff"
                out.append(
                    f'<text x="{x + _CELL // 2}" y="{y + _CELL - 5}" text-anchor="middle" '
                    f'fill="{colour}" pointer-events="none">{escape(mark)}</text>'
                )
            if cell.direct:
                out.append(
                    f'<circle cx="{x + _CELL - 4}" cy="{y + 4}" r="2.5" fill="{INTERNET_YES}" '
                    'stroke="#000000" stroke-width="0.5" pointer-events="none"/>'
                )
    if not m.workloads:
        out.append(f'<text x="{left}" y="{top + 14}">no workloads</text>')
    out.append(
        f'<rect x="{es_left}" y="{top}" width="{left + grid_w - es_left}" height="{grid_h}" '
        'fill="none" stroke="#555555" stroke-width="1"/>'
    )
    y = legend_top
    out.append(f'<text x="{_PAD}" y="{y}" font-weight="bold">Legend</text>')
    for state in (*STATES, NONE):
        y += 20
        out.append(_rect(_PAD, y - 13, COLOURS[state], DESCRIPTIONS[state], f"legend {state}"))
        out.append(f'<text x="{_PAD + _CELL + 8}" y="{y}">{escape(DESCRIPTIONS[state])}</text>')
    y += 20
    out.append(
        f'<circle cx="{_PAD + _CELL // 2}" cy="{y - 5}" r="3" fill="{INTERNET_YES}" '
        'stroke="#000000" stroke-width="0.5"/>'
    )
    out.append(
        f'<text x="{_PAD + _CELL + 8}" y="{y}">dot: the destination is also reachable '
        "directly, bypassing the gateway</text>"
    )
    y += 20
    out.append(_rect(_PAD, y - 13, INTERNET_YES, "direct internet egress", "legend internet"))
    out.append(
        f'<text x="{_PAD + _CELL + 8}" y="{y}">internet column: the workload can reach a '
        "public address directly (no default-deny egress)</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _column_x(left: int, column: int) -> int:
    """Left edge of a column: 0 is the internet column, 1.. the ExternalServices."""
    return left + column * _CELL + (_GAP if column else 0)


def _rect(
    x: int,
    y: int,
    fill: str,
    tooltip: str,
    css_class: str,
    data: dict[str, str] | None = None,
) -> str:
    """A cell: its class names the state (``none`` for no access), ``data-*`` attributes name
    the workload and ExternalService, and ``<title>`` is the tooltip."""
    extra = "".join(f" {k}={quoteattr(v)}" for k, v in (data or {}).items())
    return (
        f'<rect x="{x}" y="{y}" width="{_CELL}" height="{_CELL}" fill="{fill}" '
        f'stroke="#ffffff" stroke-width="1" class={quoteattr(css_class.strip() or "none")}'
        f"{extra}><title>{escape(tooltip)}</title></rect>"
    )
