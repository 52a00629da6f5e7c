"""A real Prometheus server for the tests: Debian's ``prometheus`` binary, a temporary
config and TSDB, 1 s scrapes and rule evaluations, the repository's alert rules.

Shared by the deploy tests that scrape a bare :class:`~streams.service.metrics.Metrics`
exporter (crafted values, alerts going pending) and those that scrape a real
worker fed with demo traffic.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Sequence

import yaml

from streams.dev.embedded_broker import free_port
from tests.prom_queries import ALERTS

#: Where the tests find it; they skip when it is missing (``apt-get install prometheus``).
PROMETHEUS = shutil.which("prometheus")
JOB = "profilestream"  # the WorkerDown alert selects on this job name


class PrometheusError(AssertionError):
    """Prometheus refused a query (bad PromQL) or answered with an error status."""


def poll(what: str, check: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.25) -> Any:
    """``check()``'s first truthy result; connection errors count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def finite(result: list[dict[str, Any]]) -> bool:
    """Whether an instant-vector result has series and none of them is NaN or infinite."""
    return bool(result) and all(math.isfinite(float(r["value"][1])) for r in result)


class PrometheusServer:
    """One Prometheus process scraping ``targets`` (host:port) as job ``profilestream``."""

    def __init__(self, workdir: Path, targets: Sequence[str], rule_files: Sequence[Path] = (ALERTS,),
                 interval: str = "1s") -> None:
        if PROMETHEUS is None:
            raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
        self.workdir = workdir
        self.targets = list(targets)
        self.rule_files = [str(p) for p in rule_files]
        self.interval = interval
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> "PrometheusServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": self.targets}]}],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        poll("prometheus to start", self._ready, timeout_s)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        with urllib.request.urlopen(f"{self.base}/-/ready", timeout=5) as response:
            return bool(response.status == 200)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"

    # -- HTTP API -----------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """``data`` of a successful ``/api/v1/<path>`` answer."""
        url = f"{self.base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400 / 422: Prometheus rejected the request
            raise PrometheusError(f"{path} {params}: {exc.read().decode(errors='replace')}") from None
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at the current time; the result vector (``[]`` when empty)."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr}: expected an instant vector, got {data['resultType']}")
        result: list[dict[str, Any]] = data["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]

    def rules_evaluated(self) -> list[dict[str, Any]] | None:
        """Every loaded rule once it has been evaluated at least once, else None."""
        rules = self.rules()
        return rules if rules and all(r["lastEvaluation"] > "0001-01-01T00:00:00Z" for r in rules) else None

    def alerts(self, *states: str) -> set[str]:
        """Names of the active alerts, restricted to ``states`` (pending, firing) when given."""
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if not states or a["state"] in states}
