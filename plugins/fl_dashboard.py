"""DADM FL dashboard: an Airflow 3 plugin for operators (rounds, versions, quarantine).

Registers a FastAPI app on the Airflow API server at ``/dadm-fl`` (HTML pages and the
JSON API behind them: :mod:`fedlib.integrations.airflow.dashboard_app`), a top-level nav
entry and a tab on every DAG run. Every route requires an Airflow user allowed to read
``fl_round`` runs.

Airflow imports plugin modules in every process that loads plugins (task runners
included), so this module imports nothing heavy: the app module (FastAPI, fedlib,
Airflow's security dependencies) is imported at the API server's first request.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any
from urllib.parse import urlparse

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/dadm-fl"  # keep in sync with dashboard_app.URL_PREFIX
WEB_MODULE = "fedlib.integrations.airflow.dashboard_app"


def _site_path() -> str:
    """The API server's own path prefix (``[api] base_url``): the UI's iframes need it."""
    from airflow.configuration import conf

    return urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def load_web_module() -> Any:
    """The dashboard's FastAPI module (imported at the first request, not by the plugin
    manager: it pulls in FastAPI, fedlib and Airflow's security dependencies)."""
    return importlib.import_module(WEB_MODULE)


class LazyApp:
    """ASGI app that builds the dashboard's FastAPI app at its first request."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = load_web_module().build_app()
        await self._app(scope, receive, send)


_SITE = _site_path()


class DadmFlDashboardPlugin(AirflowPlugin):
    """Operators' pages for the federated rounds, inside the Airflow UI."""

    name = "dadm_fl_dashboard"
    fastapi_apps = [  # noqa: RUF012 (AirflowPlugin declares these as class attributes)
        {"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "DADM FL dashboard"}
    ]
    external_views = [  # noqa: RUF012
        {
            "name": "FL rounds",
            "href": f"{_SITE}{URL_PREFIX}/rounds",
            "destination": "nav",
            "url_route": "dadm-fl",
            "nav_top_level": True,
        },
        {
            # A tab on every DAG run; the UI substitutes the URL-encoded ids. Runs of
            # other DAGs get a short "not a round" page.
            "name": "FL round",
            "href": f"{_SITE}{URL_PREFIX}/dags/{{DAG_ID}}/runs/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "dadm-fl-round",
        },
    ]
