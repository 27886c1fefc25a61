"""The DADM FL dashboard's FastAPI app: HTML pages and the JSON API behind them.

Imported by the plugin (``plugins/fl_dashboard.py``) at the API server's first request,
never when the plugin manager loads plugins. Pages are plain HTML with inline CSS and a
server-drawn SVG: no script, no external asset, every text escaped. Data:
:mod:`fedlib.ops.dashboard` over the deployment the DAGs use, built by
:mod:`fedlib.integrations.airflow.runtime` (settings file + ``fl_settings`` Variable, S3
from the ``fl_s3`` connection).

Airflow does not protect plugin apps. Every route here depends on Airflow's own
``requires_access_dag("GET", DagAccessEntity.RUN, "fl_round")``: ``get_user`` resolves
the user from a Bearer JWT or the UI's ``_token`` cookie, then the auth manager decides
whether that user may read ``fl_round`` runs. No token: 401; a bad one or a user without
that permission: 403. HTML pages answer those with a link to Airflow's login.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedlib.integrations.airflow import runtime
from fedlib.ops import dashboard
from fedlib.ops.dashboard import Page
from fedlib.server.deployment import Deployment
from fedlib.server.records import ModelsIntegrity

URL_PREFIX = "/dadm-fl"
DAG_ID = "fl_round"
PLOT_VERSIONS = 100  # versions drawn by default

log = logging.getLogger(__name__)
Limit = Annotated[int, Query(ge=1, le=dashboard.MAX_LIMIT)]
Offset = Annotated[int, Query(ge=0)]

# -- the deployment, as the DAGs build it ------------------------------------------------------

_deployment_lock = threading.Lock()
_deployments: dict[tuple[str, Any], Deployment] = {}


def current_deployment() -> Deployment:
    """The deployment the DAGs would use now (one definition: :mod:`.runtime`); one
    instance (S3 clients) per configuration."""
    settings, s3 = runtime.task_settings(), runtime.s3_config()
    key = (settings.model_dump_json(), s3)
    with _deployment_lock:
        deployment = _deployments.get(key)
        if deployment is None:
            _deployments.clear()
            deployment = _deployments[key] = Deployment(settings, s3)
    return deployment


# -- HTML ----------------------------------------------------------------------------------------

# Pages live in the Airflow UI's iframes, often narrower than a browser window: nothing
# may be wider than its frame (tables take the frame's width and wrap long run ids and
# object keys, the plot scales down), so the frame never scrolls sideways.
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d232a;background:#f7f8fa}
header{background:#0b3d5c;color:#fff;padding:10px 20px;display:flex;flex-wrap:wrap;gap:8px 20px;
align-items:center}
header a{color:#cfe8ff;text-decoration:none}header a.here{color:#fff;font-weight:bold}
header .brand{font-weight:bold;margin-right:12px}main{padding:16px 20px;max-width:100%}
*,*::before,*::after{box-sizing:border-box}h1,h2,p{overflow-wrap:anywhere}
table{border-collapse:collapse;background:#fff;width:100%;max-width:100%;margin:8px 0 16px}
th,td{border:1px solid #dde1e6;padding:4px 8px;text-align:left;vertical-align:top;
overflow-wrap:break-word}td.detail{overflow-wrap:anywhere}
th{background:#eef1f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;font-size:12px;background:#e0e0e0;
white-space:nowrap}
.published{background:#c8e6c9}.rejected{background:#ffcdd2}.waiting{background:#fff3c4}
.rollback{background:#ffe0b2}.rolledback{background:#ffcdd2}.active{background:#bbdefb}
.muted{color:#68717a}.pager a{margin-right:12px}
.plot{background:#fff;display:inline-block;max-width:100%}.plot svg{max-width:100%;height:auto}
dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 12px}dt{font-weight:bold}
dd{margin:0;min-width:0;overflow-wrap:anywhere}
code{font-size:12px;overflow-wrap:anywhere;word-break:break-all}.error{color:#b00020}
body.embedded main{padding:8px 12px}body.embedded h1{font-size:18px;margin:4px 0 8px}
"""


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_time(ms: int | None) -> str:
    if not ms:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def fmt_metric(metrics: dict[str, float] | None, name: str) -> str:
    value = (metrics or {}).get(name)
    return "—" if value is None else f"{value:.4f}"


def fmt_auc(metrics: dict[str, float] | None) -> str:
    """The AUC with its 95% bootstrap interval on the evaluation rows, when recorded."""
    return fmt_interval(
        (metrics or {}).get("auc"), (metrics or {}).get("auc_low"), (metrics or {}).get("auc_high")
    )


def fmt_interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "—"
    if low is None or high is None:
        return f"{value:.4f}"
    return f'{value:.4f} <span class="muted auc-interval">[{low:.3f}, {high:.3f}]</span>'


def badge(text: str, cls: str | None = None) -> str:
    return f'<span class="badge {esc(cls or text)}">{esc(text)}</span>'


class Links:
    """URLs of this app and of the Airflow UI, from the request's mount point."""

    def __init__(self, request: Request) -> None:
        root = str(request.scope.get("root_path") or "").rstrip("/")
        self.app = root if root.endswith(URL_PREFIX) else root + URL_PREFIX
        self.site = self.app[: -len(URL_PREFIX)]

    def run_ui(self, run_id: str, dag_id: str = DAG_ID) -> str:
        return f"{self.site}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"

    def round(self, run_id: str) -> str:
        return f"{self.app}/rounds/{quote(run_id, safe='')}"

    def quarantine(self, run_id: str) -> str:
        return f"{self.round(run_id)}/quarantine"


def render_page(
    links: Links, title: str, body: str, here: str = "", *, embedded: bool = False
) -> str:
    """A whole page; ``embedded`` (the "FL round" tab inside a DAG run) drops the site
    header and navigation: Airflow's own UI around the frame is the navigation there."""
    head = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · DADM FL</title><style>{CSS}</style></head>"
    )
    if embedded:
        return (
            f'{head}<body class="embedded"><main><h1>{esc(title)}</h1>{body}</main></body></html>'
        )
    nav = "".join(
        f'<a href="{esc(links.app)}{path}"{" class=here" if path == here else ""}>{label}</a>'
        for path, label in (("/rounds", "Rounds"), ("/versions", "Versions"), ("/plot", "Plot"))
    )
    return (
        f"{head}<body>"
        f'<header><span class="brand">DADM FL</span>{nav}'
        f'<a href="{esc(links.site)}/dags/{DAG_ID}" target="_top">{DAG_ID} in Airflow ↗</a>'
        f"</header><main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )


def pager(base: str, page: Page[Any]) -> str:
    parts = [f'<span class="muted">{len(page.items)} of {page.total}</span>']
    if page.has_newer:
        newer = {"limit": page.limit, "offset": max(0, page.offset - page.limit)}
        parts.append(f'<a href="{esc(base)}?{urlencode(newer)}">← newer</a>')
    if page.has_older:
        older = {"limit": page.limit, "offset": page.offset + page.limit}
        parts.append(f'<a href="{esc(base)}?{urlencode(older)}">older →</a>')
    return f'<p class="pager">{" ".join(parts)}</p>'


def fmt_privacy(row: Any) -> str:
    """A round's cumulative DP epsilon (delta), its budget, and a mark when the budget
    refused the round; "—" when DP is off."""
    eps = getattr(row, "privacy_epsilon", None)
    if eps is None:
        return "—"
    text = f"{eps:.3g} ({getattr(row, 'privacy_delta', None) or 0:.0e})"
    budget = getattr(row, "privacy_budget", None)
    if budget is not None:
        text += f'<br><span class="muted">budget {budget:g}</span>'
    if getattr(row, "privacy_refused", False):
        text += " " + badge("over budget", "rejected")
    return text


def fmt_share(row: Any) -> str:
    """The largest share of a round's weight one device had, and which device; "—" in
    reports written before shares were recorded."""
    share = getattr(row, "largest_weight_share", None)
    if share is None:
        return "—"
    return f"{share:.1%}<br><code>{esc(row.largest_share_client or '?')}</code>"


def devices_table(rows: Any) -> str:
    """Each device's accepted updates and share of the round's weight."""
    head = (
        "<tr><th>Client</th><th>Accepted</th><th>Weight share</th><th>Count clipped</th>"
        "<th>Share capped</th></tr>"
    )
    body = [
        f'<tr class="device" data-client-id="{esc(d.client_id)}"><td>{esc(d.client_id)}</td>'
        f'<td class="num">{d.accepted}</td><td class="num share">{d.weight_share:.1%}</td>'
        f"<td>{'yes' if d.clipped else '—'}</td><td>{'yes' if d.capped else '—'}</td></tr>"
        for d in rows
    ]
    if not rows:
        body.append('<tr><td colspan="5" class="muted">no per-device weights recorded</td></tr>')
    return f'<table id="devices">{head}{"".join(body)}</table>'


def integrity_html(integrity: ModelsIntegrity) -> str:
    """The models-bucket warning: objects no signed metadata names (reads ignore them)."""
    if not integrity.total:
        return ""
    items = "".join(
        f"<li><code>{esc(w.key)}</code>: {esc(w.reason)}</li>" for w in integrity.warnings
    )
    more = integrity.total - len(integrity.warnings)
    tail = f"<li>... and {more} more</li>" if more else ""
    return (
        f'<div class="integrity warning" id="integrity"><p><strong>Integrity warning</strong>: '
        f"{integrity.total} object(s) in the models bucket are not named by the signed "
        f"channel and are ignored.</p><ul>{items}{tail}</ul></div>"
    )


def rounds_table(links: Links, rows: list[Any]) -> str:
    head = (
        "<tr><th>Round (run id)</th><th>Airflow</th><th>Created</th><th>Decision</th>"
        "<th>Accepted</th><th>Rejected</th><th>Largest device share</th><th>Active AUC / AP</th>"
        "<th>Candidate AUC / AP</th><th>Published</th><th>Rollback</th>"
        "<th>Privacy ε (δ)</th></tr>"
    )
    body = []
    for r in rows:
        rejected = ", ".join(f"{esc(k)}: {v}" for k, v in r.rejected.items())
        if r.rejected_total:
            rejected = (
                f'<a href="{esc(links.quarantine(r.run_id))}">{r.rejected_total}</a> ({rejected})'
            )
        else:
            rejected = "0"
        rollback = "—"
        if r.rollback and r.rollback.pinned:
            rollback = (
                f"{badge('pinned', 'rollback')} v{esc(r.rollback.active_version)}"
                f'<br><span class="muted">{esc(r.rollback.reason)}</span>'
            )
        elif r.rollback and r.rollback.rolled_back:
            rollback = (
                f"{badge('rollback')} v{esc(r.rollback.active_version)} → "
                f"v{esc(r.rollback.published_version)} (model of v{esc(r.rollback.best_version)})"
                f'<br><span class="muted">{esc(r.rollback.reason)}</span>'
            )
        body.append(
            f'<tr class="round" data-run-id="{esc(r.run_id)}">'
            f'<td><a href="{esc(links.round(r.run_id))}"><code>{esc(r.run_id)}</code></a></td>'
            f'<td><a href="{esc(links.run_ui(r.run_id))}" target="_top" class="dag-run">'
            "run ↗</a></td>"
            f"<td>{fmt_time(r.created_at_ms)}</td><td>{badge(r.decision)}"
            f'<br><span class="muted">{esc(r.message)}</span></td>'
            f'<td class="num">{r.accepted}</td><td>{rejected}</td>'
            f'<td class="num largest-share">{fmt_share(r)}</td>'
            f'<td class="num">{fmt_auc(r.active_metrics)} / '
            f"{fmt_metric(r.active_metrics, 'ap')}</td>"
            f'<td class="num">{fmt_auc(r.candidate_metrics)} / '
            f"{fmt_metric(r.candidate_metrics, 'ap')}</td>"
            f'<td class="num">{"v" + esc(r.published_version) if r.published_version else "—"}</td>'
            f'<td>{rollback}</td><td class="num privacy">{fmt_privacy(r)}</td></tr>'
        )
    if not rows:
        body.append('<tr><td colspan="12" class="muted">no rounds yet</td></tr>')
    return f'<table id="rounds">{head}{"".join(body)}</table>'


def made_by(links: Links, v: Any) -> str:
    """Who made a rollback version and a link to the run that made it (its record)."""
    if not v.rollback_by:
        return ""
    text = f"by {esc(v.rollback_by)} via "
    if v.rollback_run_id and v.rollback_source:
        url = links.run_ui(v.rollback_run_id, v.rollback_source)
        text += (
            f'<a class="rollback-run" href="{esc(url)}" target="_top">'
            f"{esc(v.rollback_source)} run {esc(v.rollback_run_id)} ↗</a>"
        )
    else:
        text += esc(v.rollback_source)
    return f'<br><span class="muted made-by">{text}</span>'


def versions_table(rows: list[Any], links: Links) -> str:
    head = (
        "<tr><th>Version</th><th>AUC</th><th>AP</th><th>Parent</th><th>Rollback of</th>"
        "<th>Round</th><th>Created</th><th>Status</th></tr>"
    )
    body = []
    for v in rows:
        marks = []
        if v.active:
            marks.append(badge("active"))
        if v.is_rollback:
            marks.append(badge(f"rollback of v{v.rollback_of}", "rollback"))
        if v.rolled_back:
            marks.append(badge("rolled back", "rolledback"))
        if v.error:
            marks.append(f'<span class="error">{esc(v.error)}</span>')
        reason = (
            f'<br><span class="muted">{esc(v.rollback_reason)}</span>{made_by(links, v)}'
            if v.is_rollback
            else ""
        )
        body.append(
            f'<tr class="version" data-version="{v.version}"><td>v{v.version}</td>'
            f'<td class="num">{fmt_interval(v.auc, v.auc_low, v.auc_high)}</td>'
            f'<td class="num">{"—" if v.ap is None else f"{v.ap:.4f}"}</td>'
            f"<td>{'v' + esc(v.parent_version) if v.parent_version else '—'}</td>"
            f"<td>{'v' + esc(v.rollback_of) if v.rollback_of else '—'}</td>"
            f"<td><code>{esc(v.round_id or '—')}</code></td>"
            f"<td>{fmt_time(v.created_at_ms)}</td><td>{' '.join(marks)}{reason}</td></tr>"
        )
    return f'<table id="versions">{head}{"".join(body)}</table>'


def kept_bytes(row: Any) -> str:
    """The object that holds a refused update's bytes, or that none was kept; and whether
    the ledger recorded the verdict (a dry or replayed run records none)."""
    if row.quarantine_key:
        text = f'<code class="kept">{esc(row.quarantine_key)}</code>'
    else:
        text = '<span class="muted none-kept">none kept</span>'
    if not row.quarantined:
        text += '<br><span class="muted">verdict not recorded (dry or replayed run)</span>'
    return text


def quarantine_table(rows: list[Any]) -> str:
    head = (
        "<tr><th>Client</th><th>Reason</th><th>Detail</th><th>Size</th><th>Time</th>"
        "<th>Inbox key</th><th>Kept bytes (state bucket)</th></tr>"
    )
    body = [
        f'<tr class="quarantined"><td>{esc(q.client_id or "—")}</td>'
        f"<td>{badge(q.reason or '?', 'rejected')}</td>"
        f'<td class="detail">{esc(q.detail or "")}</td><td class="num">{q.size}</td>'
        f"<td>{fmt_time(q.time_ms)}</td><td><code>{esc(q.key)}</code></td>"
        f"<td>{kept_bytes(q)}</td></tr>"
        for q in rows
    ]
    if not rows:
        body.append('<tr><td colspan="7" class="muted">nothing refused in this round</td></tr>')
    return f'<table id="quarantine">{head}{"".join(body)}</table>'


def round_details(links: Links, row: Any, *, figures: bool = False) -> str:
    """The round as a definition list (wraps in any width); ``figures`` adds what the
    rounds table would show: rejections by reason, AUC/AP, rollback, privacy."""
    items = [
        (
            "Airflow run",
            f'<a href="{esc(links.run_ui(row.run_id))}" target="_top">{esc(row.run_id)} ↗</a>',
        ),
        ("Decision", f"{badge(row.decision)} {esc(row.message)}"),
        ("Created", fmt_time(row.created_at_ms)),
        ("Report written", fmt_time(row.finished_at_ms)),
        ("Base version", f"v{esc(row.base_version)}"),
        ("Published", f"v{esc(row.published_version)}" if row.published_version else "—"),
        ("Accepted / rejected", f"{row.accepted} / {row.rejected_total}"),
        ("Holdout version", esc(row.holdout_version or "—")),
    ]
    if figures:
        rejected = ", ".join(f"{esc(k)}: {v}" for k, v in row.rejected.items())
        if row.rejected_total:
            rejected = (
                f'<a href="{esc(links.quarantine(row.run_id))}">{row.rejected_total}</a> '
                f"({rejected})"
            )
        items += [
            ("Rejected by reason", rejected or "0"),
            (
                "Active AUC / AP",
                f"{fmt_auc(row.active_metrics)} / {fmt_metric(row.active_metrics, 'ap')}",
            ),
            (
                "Candidate AUC / AP",
                f"{fmt_auc(row.candidate_metrics)} / {fmt_metric(row.candidate_metrics, 'ap')}",
            ),
            ("Privacy ε (δ)", fmt_privacy(row)),
            ("Largest device share", fmt_share(row)),
        ]
    if row.replay_of:
        items.append(("Replay of", f"<code>{esc(row.replay_of)}</code>"))
    if row.rollback:
        items.append(
            (
                "Rollback check",
                (badge("rollback") + " " if row.rollback.rolled_back else "")
                + (badge("pinned", "rollback") + " " if row.rollback.pinned else "")
                + esc(row.rollback.reason),
            )
        )
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


# -- the app -----------------------------------------------------------------------------------


def build_app() -> FastAPI:
    """The FastAPI app; every route requires an Airflow user allowed to read fl_round runs."""
    app = FastAPI(
        title="DADM FL dashboard",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN, DAG_ID))],
    )
    headers = {
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
            "frame-ancestors 'self'; base-uri 'none'; form-action 'self'"
        ),
    }

    def is_api(request: Request) -> bool:
        root = str(request.scope.get("root_path") or "")
        return request.url.path[len(root) :].startswith("/api/")

    def html_page(
        request: Request,
        title: str,
        body: str,
        here: str = "",
        status: int = 200,
        *,
        embedded: bool = False,
    ) -> HTMLResponse:
        page = render_page(Links(request), title, body, here, embedded=embedded)
        return HTMLResponse(page, status, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if is_api(request):
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
        links = Links(request)
        body = f"<p>{esc(exc.detail)}</p>"
        if exc.status_code in (401, 403):
            login = get_auth_manager().get_url_login(next_url=str(request.url.path))
            body += (
                f'<p><a href="{esc(links.site)}{esc(login)}" target="_top">'
                "Log in to Airflow</a></p>"
            )
        return HTMLResponse(
            render_page(links, f"{exc.status_code}", body), exc.status_code, headers
        )

    def data(fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Read through fedlib; a store or configuration failure is a 503, not a 500."""
        try:
            return fn(current_deployment(), *args, **kwargs)
        except Exception as exc:
            log.exception("dashboard read failed")
            raise HTTPException(
                503, f"deployment unavailable: {type(exc).__name__}: {exc}"
            ) from exc

    # JSON API -------------------------------------------------------------------------------

    @app.get("/api/rounds")
    def api_rounds(limit: Limit = dashboard.DEFAULT_LIMIT, offset: Offset = 0) -> dict[str, Any]:
        return data(dashboard.rounds, limit=limit, offset=offset).as_dict()

    @app.get("/api/rounds/{run_id:path}/quarantine")
    def api_quarantine(
        run_id: str, limit: Limit = dashboard.DEFAULT_LIMIT, offset: Offset = 0
    ) -> dict[str, Any]:
        page = data(dashboard.quarantine, run_id, limit=limit, offset=offset)
        if page is None:
            raise HTTPException(404, f"no round {run_id!r}")
        return {"run_id": run_id, **page.as_dict()}

    @app.get("/api/rounds/{run_id:path}")
    def api_round(run_id: str) -> dict[str, Any]:
        row = data(dashboard.round_detail, run_id)
        if row is None:
            raise HTTPException(404, f"no report for round {run_id!r}")
        return dashboard.to_jsonable(row)

    @app.get("/api/versions")
    def api_versions(limit: Limit = dashboard.DEFAULT_LIMIT, offset: Offset = 0) -> dict[str, Any]:
        return data(dashboard.versions, limit=limit, offset=offset).as_dict()

    @app.get("/api/integrity")
    def api_integrity() -> dict[str, Any]:
        return data(dashboard.models_integrity).to_doc()

    @app.get("/api/rejected")
    def api_rejected(scan: Limit = dashboard.DEFAULT_LIMIT) -> dict[str, Any]:
        found = data(dashboard.rejected_candidates, scan=scan)
        return {"items": dashboard.to_jsonable(found), "scanned": scan}

    # HTML pages -----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        return RedirectResponse(f"{Links(request).app}/rounds", 307, headers)

    @app.get("/rounds", response_class=HTMLResponse)
    def rounds_page(
        request: Request, limit: Limit = dashboard.DEFAULT_LIMIT, offset: Offset = 0
    ) -> HTMLResponse:
        links = Links(request)
        page = data(dashboard.rounds, limit=limit, offset=offset)
        plot = plot_svg(PLOT_VERSIONS, dashboard.rejected_in(page.items))
        body = (
            f"{integrity_html(data(dashboard.models_integrity))}"
            f'<div class="plot">{plot}</div>'
            "<p>Newest first. AUC / AP on the holdout's evaluation rows (the gate compares "
            "on its calibration rows), with the AUC's 95% bootstrap interval. "
            f'<a href="{esc(links.app)}/api/rounds">JSON</a></p>'
            f"{pager(links.app + '/rounds', page)}{rounds_table(links, page.items)}"
            f"{pager(links.app + '/rounds', page)}"
        )
        return html_page(request, "Rounds", body, "/rounds")

    @app.get("/rounds/{run_id:path}/quarantine", response_class=HTMLResponse)
    def quarantine_page(
        request: Request, run_id: str, limit: Limit = dashboard.DEFAULT_LIMIT, offset: Offset = 0
    ) -> HTMLResponse:
        links = Links(request)
        page = data(dashboard.quarantine, run_id, limit=limit, offset=offset)
        if page is None:
            raise HTTPException(404, f"no round {run_id!r}")
        body = (
            f'<p>Round <a href="{esc(links.round(run_id))}"><code>{esc(run_id)}</code></a>: '
            "updates it refused, kept with their reason in the ledger's quarantine.</p>"
            f"{pager(links.quarantine(run_id), page)}{quarantine_table(page.items)}"
        )
        return html_page(request, "Quarantine", body)

    def round_body(request: Request, run_id: str, *, embedded: bool = False) -> str:
        """The round's details and quarantine; embedded, its figures go into the details
        list instead of an eleven-column table that no narrow frame could hold."""
        links = Links(request)
        row = data(dashboard.round_detail, run_id)
        if row is None:
            return (
                f"<p>No round report for <code>{esc(run_id)}</code> (yet): a report is written "
                f'when the run\'s finalize task ends. <a href="{esc(links.run_ui(run_id))}" '
                'target="_top">The run in Airflow ↗</a></p>'
            )
        page = data(dashboard.quarantine, run_id, limit=dashboard.DEFAULT_LIMIT)
        quarantine = ""
        if page is not None:
            more = (
                f'<p><a href="{esc(links.quarantine(run_id))}">all {page.total} →</a></p>'
                if page.has_older
                else ""
            )
            quarantine = f"<h2>Quarantine ({page.total})</h2>{quarantine_table(page.items)}{more}"
        shown = (
            f", the {len(row.devices)} largest shares"
            if len(row.devices) < row.device_count
            else ""
        )
        devices = f"<h2>Devices ({row.device_count}{shown})</h2>{devices_table(row.devices)}"
        if embedded:
            return round_details(links, row, figures=True) + devices + quarantine
        return round_details(links, row) + rounds_table(links, [row]) + devices + quarantine

    @app.get("/rounds/{run_id:path}", response_class=HTMLResponse)
    def round_page(request: Request, run_id: str) -> HTMLResponse:
        return html_page(request, f"Round {run_id}", round_body(request, run_id))

    @app.get("/dags/{dag_id}/runs/{run_id:path}", response_class=HTMLResponse)
    def dag_run_page(request: Request, dag_id: str, run_id: str) -> HTMLResponse:
        """The per-run tab Airflow shows on every DAG run ({DAG_ID}/{RUN_ID} filled in)."""
        if dag_id != DAG_ID:
            body = (
                f"<p>Only <code>{DAG_ID}</code> runs are federated rounds; "
                f"this is a run of <code>{esc(dag_id)}</code>.</p>"
            )
            return html_page(request, "Not a round", body, embedded=True)
        body = round_body(request, run_id, embedded=True)
        return html_page(request, f"Round {run_id}", body, embedded=True)

    @app.get("/versions", response_class=HTMLResponse)
    def versions_page(
        request: Request, limit: Limit = dashboard.DEFAULT_LIMIT, offset: Offset = 0
    ) -> HTMLResponse:
        links = Links(request)
        page = data(dashboard.versions, limit=limit, offset=offset)
        body = (
            f"<p>Newest first; metrics are each version's scores when it was published, on "
            "the holdout's evaluation rows (never used to fit its threshold), with the AUC's "
            f'95% bootstrap interval. <a href="{esc(links.app)}/api/versions">JSON</a></p>'
            f"{pager(links.app + '/versions', page)}{versions_table(page.items, links)}"
        )
        return html_page(request, "Model versions", body, "/versions")

    def plot_svg(
        versions: int,
        rejected: list[dashboard.RejectedCandidate] | None = None,
        scan: int = dashboard.DEFAULT_LIMIT,
    ) -> str:
        """The newest ``versions`` versions; rejected candidates given, or from the newest
        ``scan`` rounds (two small reads per round)."""
        rows = data(dashboard.version_rows, versions)
        if rejected is None:
            rejected = data(dashboard.rejected_candidates, scan=scan)
        oldest = min((r.version for r in rows), default=0)
        shown = [c for c in rejected if (c.base_version or 0) >= oldest]
        return dashboard.render_plot_svg(rows, shown)

    @app.get("/plot", response_class=HTMLResponse)
    def plot_page(
        request: Request,
        versions: Limit = PLOT_VERSIONS,
        scan: Limit = dashboard.DEFAULT_LIMIT,
    ) -> HTMLResponse:
        links = Links(request)
        query = urlencode({"versions": versions, "scan": scan})
        body = (
            f"<p>The newest {versions} versions; rejected candidates of the newest {scan} "
            f'rounds. <a href="{esc(links.app)}/plot.svg?{query}">SVG</a></p>'
            f'<div class="plot">{plot_svg(versions, scan=scan)}</div>'
        )
        return html_page(request, "AUC and AP across versions", body, "/plot")

    @app.get("/plot.svg")
    def plot_image(
        versions: Limit = PLOT_VERSIONS, scan: Limit = dashboard.DEFAULT_LIMIT
    ) -> Response:
        svg = plot_svg(versions, scan=scan)
        return Response(svg, media_type="image/svg+xml", headers=headers)

    return app
