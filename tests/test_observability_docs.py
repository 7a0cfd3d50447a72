"""docs/observability.md: the Grafana panels parse and use only metrics the library reports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from resilient_db.telemetry.metrics import BREAKER_STATE_VALUES, METRICS

DOC = Path(__file__).resolve().parents[1] / "docs" / "observability.md"


def panels() -> list[dict[str, Any]]:
    """The JSON block after the ``grafana-panels`` marker."""
    text = DOC.read_text()
    match = re.search(r"<!-- grafana-panels -->\n```json\n(.*?)\n```", text, re.S)
    assert match is not None, "no grafana-panels JSON block"
    data = json.loads(match.group(1))
    assert isinstance(data, list)
    return data


def test_grafana_panels_query_declared_metrics() -> None:
    """Every metric a panel queries is one the library declares (by its Prometheus name)."""
    known = {m.prometheus_name for m in METRICS}
    labels = {a.replace(".", "_") for m in METRICS for a in m.attributes}
    used = set()
    for panel in panels():
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(?:db_client|resilient_db)_[a-z_]+", target["expr"]))
    assert set() == used - known - labels
    assert {"resilient_db_breaker_state", "resilient_db_breaker_rejections_total"} <= used


def test_grafana_breaker_panel_maps_every_state_value() -> None:
    """The state-timeline's value mapping is the gauge's: 0 closed, 1 half-open, 2 open."""
    (timeline,) = [p for p in panels() if p["type"] == "state-timeline"]
    (mapping,) = timeline["fieldConfig"]["defaults"]["mappings"]
    shown = {int(v): o["text"] for v, o in mapping["options"].items()}
    assert {v: s for s, v in BREAKER_STATE_VALUES.items()} == shown
