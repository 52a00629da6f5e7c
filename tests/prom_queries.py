"""Every PromQL expression of the Grafana dashboard and the alert rules.

One list for the tests that check the expressions: against the names
``streams.service.metrics.Metrics`` exports (tests/integration/test_deploy.py), with promtool, and
against a real Prometheus server scraping a worker.  Grafana's
``$__rate_interval`` is replaced by a concrete range so plain Prometheus can
run the dashboard's queries too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "profilestream.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

#: Metrics Prometheus adds to every scraped target itself.
PROMETHEUS_SYNTHETIC = frozenset({
    "up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
})


@dataclass(frozen=True)
class Query:
    source: str  # "dashboard: <panel> [<refId>]" or "alert: <name>"
    expr: str


def dashboard_queries(rate_interval: str = "1m", instance: str = ".*") -> list[Query]:
    """The dashboard's target expressions as Grafana sends them: ``$__rate_interval``
    replaced by ``rate_interval`` and the ``$instance`` variable by ``instance`` (a
    regex; Grafana's "All" is ``.*``, a multi-value selection ``(a|b)``)."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", rate_interval).replace("$instance", instance)
            if "$" in expr:
                raise ValueError(f"panel {panel['title']!r} uses a Grafana variable prometheus cannot resolve: {expr}")
            out.append(Query(f"dashboard: {panel['title']} [{target['refId']}]", expr))
    return out


def alert_queries() -> list[Query]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [Query(f"alert: {rule['alert']}", rule["expr"].strip())
            for group in rules["groups"] for rule in group["rules"]]


def all_queries(rate_interval: str = "1m") -> list[Query]:
    return dashboard_queries(rate_interval) + alert_queries()


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "inf", "nan",
})


def metric_names(expr: str) -> set[str]:
    """Metric names of the vector selectors in a PromQL expression.

    Enough PromQL for this repository's expressions: label matchers, ranges,
    strings and grouping clauses are removed first, so what is left that is
    an identifier not followed by ``(`` and not a keyword is a metric name.
    """
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    return {m.group(1) for m in _IDENT.finditer(text)
            if m.group(2) is None and m.group(1).lower() not in _KEYWORDS}


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*(?!bool\b)(?=[-+]?(?:\d|\.\d|inf\b|nan\b))", re.IGNORECASE)


def with_bool(expr: str) -> str:
    """``expr`` with every comparison against a number turned into a ``bool`` comparison.

    ``x > 60`` *filters*: it is empty while nothing is wrong, which is what an
    alert expression should be on a healthy worker, and says nothing about
    whether ``x`` has data.  ``x > bool 60`` keeps every series of ``x`` with
    value 0 or 1, so it is non-empty exactly when every operand has series and
    the ``and on (...)`` joins between the operands match -- the same data the
    alert needs in order to ever fire.  Label matchers and strings are left alone.
    """
    out, pos = [], 0
    for protected in re.finditer(f"{_STRINGS.pattern}|{_MATCHERS.pattern}", expr):
        out.append(_COMPARISON.sub(r"\1 bool ", expr[pos:protected.start()]))
        out.append(protected.group(0))
        pos = protected.end()
    out.append(_COMPARISON.sub(r"\1 bool ", expr[pos:]))
    return "".join(out)
