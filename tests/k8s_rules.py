"""deploy/k8s/prometheusrule.yaml rendered from deploy/prometheus/alerts.yml.

The Prometheus Operator loads alert rules from a PrometheusRule resource, not
from a rules file; its ``spec.groups`` is the rules file's ``groups``.  One
source (alerts.yml, which promtool unit-tests) and this renderer keep the two
from drifting; tests/integration/test_deploy.py checks the committed file equals
:func:`render`.  ``python -m tests.k8s_rules > deploy/k8s/prometheusrule.yaml``
rewrites it.
"""

from __future__ import annotations

from typing import Any

import yaml

from tests.prom_queries import ALERTS

HEADER = """\
# The alert rules of deploy/prometheus/alerts.yml for the Prometheus Operator.
# Generated: edit alerts.yml, then run
#   .venv/bin/python -m tests.k8s_rules > deploy/k8s/prometheusrule.yaml
# (tests/integration/test_deploy.py fails while the two differ).  Add the label your
# Prometheus' ruleSelector matches (kube-prometheus-stack: release: <its
# release name>) under metadata.labels.
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the PromQL expressions) as literal blocks, as in alerts.yml."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "profilestream", "labels": {"app.kubernetes.io/name": "profilestream"}},
        "spec": {"groups": yaml.safe_load(ALERTS.read_text())["groups"]},
    }


def render() -> str:
    return HEADER + yaml.dump(prometheus_rule(), Dumper=_Dumper, sort_keys=False, width=1_000_000)


if __name__ == "__main__":
    print(render(), end="")
