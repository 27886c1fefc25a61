"""The dashboard plugin inside a real Airflow API server, with Airflow's own auth.

The server (``airflow api-server``, SimpleAuthManager, this repo's plugins/) serves a
deployment whose four rounds were run in-process (see ``tests/plugin_fixtures.py``).
Anonymous requests must be refused; a JWT from ``POST /auth/token`` (Bearer header) or
the UI's ``_token`` cookie must see exactly what the reports say.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from urllib.parse import quote

import jwt
import pytest
import requests

from tests.plugin_fixtures import (
    DASHBOARD,
    ROOT,
    RUN_PUBLISH,
    RUN_QUARANTINE,
    RUN_REJECTED,
    RUN_ROLLBACK,
)

Q = quote(RUN_QUARANTINE, safe="")
PAGES = [
    "/",
    "/rounds",
    "/versions",
    "/plot",
    "/plot.svg",
    f"/rounds/{Q}",
    f"/rounds/{Q}/quarantine",
    f"/dags/fl_round/runs/{Q}",
]
API = [
    "/api/rounds",
    "/api/versions",
    "/api/rejected",
    "/api/integrity",
    f"/api/rounds/{Q}",
    f"/api/rounds/{Q}/quarantine",
]


def get(server, path: str, **kwargs) -> requests.Response:
    kwargs.setdefault("timeout", 30)
    kwargs.setdefault("allow_redirects", False)
    return requests.get(f"{server.url}{DASHBOARD}{path}", **kwargs)  # noqa: S113 (set above)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_route_refuses_anonymous_and_forged_credentials(dashboard_server):
    server = dashboard_server
    for path in PAGES + API:
        anonymous = get(server, path)
        assert anonymous.status_code == 401, (path, anonymous.status_code, anonymous.text[:200])
        assert "AUC" not in anonymous.text and RUN_PUBLISH not in anonymous.text
    page = get(server, "/rounds")
    assert page.headers["content-type"].startswith("text/html")
    assert "/auth/login?next=" in page.text  # the HTML answer links to Airflow's login
    assert get(server, "/api/rounds").json() == {"detail": "Not authenticated"}

    forged = jwt.encode(  # Airflow's claims and algorithm, another secret
        {"sub": "admin", "role": "ADMIN", "exp": int(time.time()) + 600},
        "not-the-servers-secret-" * 3,
        algorithm="HS512",
    )
    for credentials in (
        {"headers": bearer("garbage")},
        {"headers": bearer(forged)},
        {"cookies": {"_token": forged}},
    ):
        for path in ("/rounds", "/api/rounds"):
            refused = get(server, path, **credentials)
            assert refused.status_code == 403, (path, credentials, refused.status_code)
            assert RUN_PUBLISH not in refused.text


def test_json_api_with_a_token_matches_the_reports(dashboard_server):
    server, history = dashboard_server, dashboard_server.history
    auth = bearer(server.token())

    rounds = get(server, "/api/rounds", headers=auth)
    assert rounds.status_code == 200, rounds.text
    doc = rounds.json()
    assert doc["total"] == len(history.reports) == 4 and len(doc["items"]) == 4
    assert doc["items"][0]["run_id"] == RUN_ROLLBACK  # newest first
    for item in doc["items"]:
        report = history.reports[item["run_id"]]
        for key in ("decision", "accepted", "rejected", "base_version", "published_version"):
            assert item[key] == report[key], (item["run_id"], key)
        assert item["rejected_total"] == sum(report["rejected"].values())
        numbers = {k: v for k, v in (report["candidate_metrics"] or {}).items() if k != "part"}
        assert item["candidate_metrics"] == (numbers or report["candidate_metrics"])
        assert item["metrics_part"] == (report["active_metrics"] or {}).get("part")
    by_id = {item["run_id"]: item for item in doc["items"]}
    assert by_id[RUN_QUARANTINE]["rejected"] == {"norm_exceeded": 1, "unknown_client": 1}
    assert by_id[RUN_REJECTED]["decision"] == "rejected"
    assert by_id[RUN_ROLLBACK]["rollback"]["rolled_back"] is True
    assert by_id[RUN_ROLLBACK]["rollback"]["published_version"] == history.rollback_version

    page = get(server, "/api/rounds", params={"limit": 3, "offset": 3}, headers=auth).json()
    assert page["total"] == 4 and len(page["items"]) == 1 and page["offset"] == 3
    for bad in ({"limit": 0}, {"limit": 10_000}, {"offset": -1}):
        assert get(server, "/api/rounds", params=bad, headers=auth).status_code == 422

    versions = get(server, "/api/versions", headers=auth).json()
    assert [v["version"] for v in versions["items"]] == [5, 4, 3, 2, 1]
    top = versions["items"][0]
    assert (
        top["active"] and top["is_rollback"] and top["parent_version"] == history.degraded_version
    )
    assert versions["items"][1]["rolled_back"] and not versions["items"][1]["active"]

    quarantine = get(server, f"/api/rounds/{Q}/quarantine", headers=auth).json()
    assert quarantine["total"] == 2 and quarantine["run_id"] == RUN_QUARANTINE
    assert {q["key"]: q["reason"] for q in quarantine["items"]} == history.refused
    assert all(q["quarantined"] and q["client_id"] == "mallory" for q in quarantine["items"])
    empty = get(server, f"/api/rounds/{quote(RUN_PUBLISH, safe='')}/quarantine", headers=auth)
    assert empty.json()["total"] == 0
    assert get(server, "/api/rounds/nope/quarantine", headers=auth).status_code == 404

    detail = get(server, f"/api/rounds/{quote(RUN_REJECTED, safe='')}", headers=auth).json()
    assert detail["run_id"] == RUN_REJECTED and detail["decision"] == "rejected"
    [rejected] = get(server, "/api/rejected", headers=auth).json()["items"]
    assert rejected["run_id"] == RUN_REJECTED
    assert rejected["candidate_auc"] == history.reports[RUN_REJECTED]["candidate_metrics"]["auc"]

    # a read-only Airflow user may read fl_round runs, so it sees the dashboard too
    viewer = get(server, "/api/rounds", headers=bearer(server.token("viewer")))
    assert viewer.status_code == 200 and viewer.json()["total"] == 4


def test_html_pages_with_the_ui_cookie(dashboard_server):
    server, history = dashboard_server, dashboard_server.history
    cookie = {"_token": server.token()}

    rounds = get(server, "/rounds", cookies=cookie)
    assert rounds.status_code == 200, rounds.text[:500]
    assert rounds.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in rounds.headers["content-security-policy"]
    text = rounds.text
    assert '<table id="rounds">' in text and text.count('<tr class="round"') == 4
    assert "<svg" in text and 'class="auc-line"' in text and "<script" not in text
    for run_id in history.reports:
        assert f'/dags/fl_round/runs/{quote(run_id, safe="")}"' in text  # the run in Airflow
    assert f"{DASHBOARD}/rounds/{Q}/quarantine" in text

    quarantine = get(server, f"/rounds/{Q}/quarantine", cookies=cookie).text
    assert quarantine.count('<tr class="quarantined"') == 2
    for key, reason in history.refused.items():
        assert key in quarantine and reason in quarantine
    api = get(server, f"/api/rounds/{Q}/quarantine", headers=bearer(server.token())).json()
    for item in api["items"]:  # the kept bytes' real object key, as the page shows it
        assert item["quarantine_key"].endswith(".bin")
        assert f'<code class="kept">{item["quarantine_key"]}</code>' in quarantine

    detail = get(server, f"/dags/fl_round/runs/{Q}", cookies=cookie).text
    assert "Quarantine (2)" in detail and RUN_QUARANTINE in detail
    other = get(server, f"/dags/some_other_dag/runs/{Q}", cookies=cookie).text
    assert "Not a round" in other

    versions = get(server, "/versions", cookies=cookie).text
    assert versions.count('<tr class="version"') == 5 and "rollback of v" in versions

    svg = get(server, "/plot.svg", cookies=cookie)
    assert svg.headers["content-type"].startswith("image/svg+xml")
    ET.fromstring(svg.content)
    assert "rejected auc" in svg.text and 'class="rollback"' in svg.text

    index = get(server, "/", cookies=cookie)
    assert index.status_code == 307 and index.headers["location"] == f"{DASHBOARD}/rounds"


def test_plugin_is_registered_with_its_views(dashboard_server):
    server = dashboard_server
    resp = requests.get(f"{server.url}/api/v2/plugins", headers=bearer(server.token()), timeout=30)
    assert resp.status_code == 200, resp.text
    [plugin] = [p for p in resp.json()["plugins"] if p["name"] == "dadm_fl_dashboard"]
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == [DASHBOARD]
    views = {v["destination"]: v for v in plugin["external_views"]}
    assert views["nav"]["href"] == f"{DASHBOARD}/rounds" and views["nav"]["url_route"]
    assert views["dag_run"]["href"] == f"{DASHBOARD}/dags/{{DAG_ID}}/runs/{{RUN_ID}}"
    errors = requests.get(
        f"{server.url}/api/v2/importErrors", headers=bearer(server.token()), timeout=30
    )
    assert errors.status_code == 200


@pytest.mark.parametrize("path", ["/rounds", "/api/rounds"])
def test_token_in_query_string_is_not_accepted(dashboard_server, path):
    """Only Airflow's channels count (header, cookie): a token elsewhere is anonymous."""
    resp = get(dashboard_server, path, params={"token": dashboard_server.token()})
    assert resp.status_code == 401


def test_loading_plugins_imports_nothing_heavy(tmp_path):
    """Every Airflow process that loads plugins (task runners too) imports our plugin
    module: it must not pull in FastAPI, fedlib or the app module (first request only)."""
    code = (
        "import json, sys\n"
        "from airflow import plugins_manager\n"
        "plugins, errors = plugins_manager._get_plugins()\n"
        "heavy = ('fedlib.integrations.airflow.dashboard_app', 'fastapi', 'fedlib',\n"
        "         'airflow.api_fastapi.core_api.security')\n"
        "print(json.dumps({'plugins': [p.name for p in plugins], 'errors': errors,\n"
        "    'imported': [m for m in heavy if m in sys.modules]}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(tmp_path),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc == {"plugins": ["dadm_fl_dashboard"], "errors": {}, "imported": []}


def test_quarantine_table_names_the_kept_object_or_says_none(airflow_home):
    """Each row names the object holding the refused bytes (``....bin``), or says none
    was kept; a verdict the ledger did not record (dry run) is marked."""
    import dataclasses

    from fedlib.integrations.airflow.dashboard_app import quarantine_table
    from fedlib.ops.dashboard import QuarantineRow

    kept = QuarantineRow(
        key="updates/dev-1/u1",
        client_id="dev-1",
        reason="malformed",
        detail="bad header",
        size=3,
        sha256="ab" * 32,
        quarantine_key="quarantine/dev-1/u1/abababababababab.bin",
        quarantined=True,
        time_ms=1,
    )
    gone = dataclasses.replace(kept, key="updates/dev-1/u2", quarantine_key=None)
    dry = dataclasses.replace(kept, key="updates/dev-1/u3", quarantined=False)
    page = quarantine_table([kept, gone, dry])
    assert page.count(f'<code class="kept">{kept.quarantine_key}</code>') == 2
    assert page.count("none kept") == 1 and page.count("verdict not recorded") == 1
    assert "quarantine/dev-1/u1/abababababababab<" not in page  # never the bare prefix
