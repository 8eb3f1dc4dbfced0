"""The Grafana dashboard cannot silently go blank: start the real API and a real worker
(``python -m ediffi api`` / ``worker --metrics-port``, a real redis-server, the tiny
model), run one job, scrape both ``/metrics`` endpoints, and check that every series the
dashboard (deploy/grafana/dashboards/*.json) queries is exposed by one of them, with the
labels its ``by (...)`` clauses group on and the values its ``label="value"`` filters ask for.

Metric names come from a real PromQL parse (promql-parser). Prometheus's own ``up`` and the
dcgm-exporter's ``DCGM_*`` GPU series are not ours and are skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import Cluster, metric_value

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # a worker process start is > 20 s here

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
#: Labels Prometheus attaches at scrape time (not in the exposition), and ``le`` of buckets.
SCRAPE_LABELS = {"job", "instance"}
_GRAFANA_VARIABLES = re.compile(r"\$\{?(__rate_interval|__interval|__range)\}?")


def _not_ours(name: str) -> bool:
    return name == "up" or name.startswith("DCGM_")


@dataclass
class Query:
    where: str
    metric: str
    equal: dict[str, str] = field(default_factory=dict)  # label="value" filters
    grouping: set[str] = field(default_factory=set)  # labels of by (...) / on (...) clauses


def dashboard_queries() -> list[Query]:
    import promql_parser

    queries: list[Query] = []
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text())

        def panels(items):
            for panel in items:
                yield panel
                yield from panels(panel.get("panels", []))

        for panel in panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                expr = target.get("expr")
                if not expr:
                    continue
                ast = promql_parser.parse(_GRAFANA_VARIABLES.sub("5m", expr))
                selectors: list[Query] = []
                grouping: set[str] = set()

                def visit(node) -> None:
                    if isinstance(node, promql_parser.VectorSelector):
                        matchers = node.matchers.matchers
                        name = node.name or next(m.value for m in matchers if m.name == "__name__")
                        equal = {m.name: m.value for m in matchers
                                 if m.op == promql_parser.MatchOp.Equal and m.name != "__name__"}
                        selectors.append(Query(f"{path.name}: {panel.get('title')}", name, equal))
                    elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
                        grouping.update(node.modifier.labels)

                promql_parser.walk(ast, visit)
                for selector in selectors:
                    selector.grouping = set(grouping)
                queries += selectors
    return queries


def samples_by_name(*scrapes: str) -> dict[str, list[dict[str, str]]]:
    """Sample name (``_bucket``/``_sum``/``_count``/``_total`` as exposed) -> label sets."""
    found: dict[str, list[dict[str, str]]] = {}
    for text in scrapes:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


@pytest.fixture(scope="module")
def scrapes(tiny_model_dir, tmp_path_factory) -> tuple[str, str]:
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("metrics-logs"), persistent=False)
    try:
        cluster.start(workers=1)
        response = cluster.http.post("/generate", json={"prompt": "a red circle on the left", "steps": 2, "seed": 1})
        assert response.status_code == 200, response.text
        assert cluster.http.get(f"/jobs/{response.json()['id']}").status_code == 200
        (worker,) = cluster.workers
        api_text = cluster.http.get("/metrics").text
        worker_text = worker.scrape()
        return api_text, worker_text
    finally:
        cluster.close()


def test_the_dashboard_queries_something():
    queries = dashboard_queries()
    assert len({q.metric for q in queries if not _not_ours(q.metric)}) >= 10


def test_every_metric_the_dashboard_queries_is_exposed_by_the_api_or_a_worker(scrapes):
    api_text, worker_text = scrapes
    exposed = samples_by_name(api_text, worker_text)
    missing, unlabelled, unmatched = [], [], []
    for query in dashboard_queries():
        if _not_ours(query.metric):
            continue
        samples = exposed.get(query.metric)
        if not samples:
            missing.append(f"{query.where}: {query.metric}")
            continue
        if not any(query.grouping - SCRAPE_LABELS <= set(labels) | {"le"} for labels in samples):
            unlabelled.append(f"{query.where}: {query.metric} lacks {sorted(query.grouping - SCRAPE_LABELS)}")
        if not any(all(labels.get(k) == v for k, v in query.equal.items()) for labels in samples):
            unmatched.append(f"{query.where}: no {query.metric} sample with {query.equal}")
    assert not missing, "dashboard queries series nobody exposes:\n" + "\n".join(missing)
    assert not unlabelled, "\n".join(unlabelled)
    assert not unmatched, "\n".join(unmatched)


def test_each_process_exposes_its_own_side(scrapes):
    """The API exposes the request/queue side, the worker the engine side (a sanity check
    that the two scrapes are what the test thinks they are)."""
    api_text, worker_text = scrapes
    api, worker = samples_by_name(api_text), samples_by_name(worker_text)
    assert "ediffi_http_requests_total" in api and "ediffi_queue_depth" in api
    assert "ediffi_batch_size_bucket" in worker and "ediffi_denoiser_forward_seconds_count" in worker
    assert any(s.get("endpoint") == "/generate" for s in api["ediffi_http_requests_total"])
    assert metric_value(worker_text, "ediffi_images_generated_total") == 1
    assert metric_value(worker_text, "ediffi_jobs_completed_total", {"status": "succeeded"}) == 1
    # Neither exports the other's metrics as constant zeros (they broke max()/min() across targets),
    # and both carry the process collectors (RSS, CPU, open fds).
    for name in ("ediffi_workers_alive", "ediffi_queue_up", "ediffi_queue_depth", "ediffi_jobs_submitted_total"):
        assert name not in worker, name
    for name in ("ediffi_worker_heartbeats_total", "ediffi_images_generated_total", "ediffi_active_requests"):
        assert name not in api, name
    for scrape in (api, worker):
        assert "process_resident_memory_bytes" in scrape and "process_cpu_seconds_total" in scrape
