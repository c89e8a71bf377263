"""The HTML pages escape every string a user controls: the report (through the library and through the
service, from a stored grid), the service's index page and the MLflow links; a link base that is not http(s)
is refused."""
from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from dashboards.pages import render_index
from dashboards.report import render_report
from dashboards.stats import compare
from dashboards.tables import document
from tests.test_report import Node, Tree, history, svg_texts

# Closes an attribute and an element, opens a script and an image with a handler, and carries an entity.
HOSTILE = "\"'><script>alert(1)</script><img src=x onerror=alert(2)>&amp;"
MLFLOW = "http://mlflow.example:5000/'\"><script>alert(3)</script>"
# What a report may hold: its own elements and matplotlib's SVG (`text` elements, no scripts, no handlers).
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "nav", "a", "header", "h1", "span", "p", "time",
             "table", "thead", "tbody", "tr", "th", "td", "caption", "div", "details", "summary", "dl", "dt", "dd",
             "section", "h2", "figure", "figcaption", "svg", "defs", "g", "path", "use", "text", "tspan", "clippath",
             "rect"}
ATTRIBUTES = {"lang", "charset", "name", "content", "http-equiv", "href", "id", "class", "datetime", "style", "title",
              "data-dataset", "data-depth", "data-variant", "data-key", "target", "rel", "xmlns", "xmlns:xlink",
              "width", "height", "viewbox", "version", "type", "d", "clip-path", "x", "y", "xlink:href", "transform"}


def nodes(node: Node) -> list[Node]:
    return [node] + [n for child in node.children for n in nodes(child)]


def assert_inert(page: str) -> Node:
    """No element or attribute came from the data: the page parses to the report's own vocabulary."""
    root = Tree(page).root
    found = nodes(root)[1:]
    assert {n.tag for n in found} <= PAGE_TAGS, {n.tag for n in found} - PAGE_TAGS
    assert {a for n in found for a in n.attrs} <= ATTRIBUTES, {a for n in found for a in n.attrs} - ATTRIBUTES
    assert "<script" not in page and "<img" not in page
    return root


def hostile_report() -> tuple[str, list[dict]]:
    """Every string the report shows, from a user or a server, hostile: names, the dataset, the spec's keys
    and values, trial keys, MLflow run ids and the MLflow address."""
    variant, dataset = f"v{HOSTILE}", f"d{HOSTILE}"
    trials = [{"key": f"k{seed}{HOSTILE}", "dataset": dataset, "depth": 20, "variant": v, "seed": seed,
               "status": "finished", "test_error": 8.0 + seed / 10 + (v == variant), "mlflow_run_id": f"r{HOSTILE}",
               "history": history(8.0, seed, range(0, 3201, 800))}
              for v in ("original", variant) for seed in range(3)]
    grid = {"id": f"id{HOSTILE}", "name": f"n{HOSTILE}", "counts": {"finished": 6},
            "spec": {"data_dir": f"/data/{HOSTILE}", f"key{HOSTILE}": [HOSTILE, {"k": HOSTILE}]}}
    probes = [{"variant": variant, "depth": 20, "grad_ratio_first_last": 2.0,
               "units": [{"unit": u, "x_norm": 1.0 + u, "grad_norm": 2.0 - u / 10} for u in range(1, 10)]}]
    doc = document(f"g{HOSTILE}", "test_error", compare(trials, "original"))
    return render_report(doc, trials, grid, probes, mlflow_url=MLFLOW), trials


def test_report_shows_hostile_strings_as_text():
    page, trials = hostile_report()
    root = assert_inert(page)
    assert root.find_all("title")[0].all_text() == f"n{HOSTILE} – Ablate report"
    [h1] = root.find_all("h1")
    assert h1.all_text() == f"n{HOSTILE} id{HOSTILE}"
    spec = dict(zip((n.all_text() for n in root.find_all("dt")), (n.all_text() for n in root.find_all("dd"))))
    assert spec == {"data_dir": f"/data/{HOSTILE}", f"key{HOSTILE}": json.dumps([HOSTILE, {"k": HOSTILE}])}
    assert f"grid g{HOSTILE}" in root.find_all("h2")[0].all_text()
    [table] = root.find_all("table", "comparison")
    assert table.attrs["data-dataset"] == f"d{HOSTILE}" and table.find_all("caption")[0].all_text() == \
        f"d{HOSTILE} ResNet-20"
    assert [r.attrs["data-variant"] for r in table.find_all("tbody")[0].find_all("tr")] == ["original", f"v{HOSTILE}"]
    for kind in ("errorbars", "curves"):
        [figure] = root.find_all("figure", kind)
        assert figure.attrs["data-dataset"] == f"d{HOSTILE}"
        assert figure.find_all("figcaption")[0].all_text().startswith(f"d{HOSTILE} ResNet-20: ")
        assert any(t.startswith(f"v{HOSTILE}") for t in svg_texts(figure)), svg_texts(figure)
    assert root.find_all("table", "probes")[0].find_all("td")[0].all_text() == f"v{HOSTILE}"
    rows = root.find_all("table", "trials")[0].find_all("tbody")[0].find_all("tr")
    assert {r.attrs["data-key"] for r in rows} == {t["key"] for t in trials}
    links = [a for r in rows for a in r.find_all("a")]
    assert len(links) == 6
    assert {a.attrs["href"] for a in links} == {f"{MLFLOW}/#/runs/{quote(f'r{HOSTILE}', safe='')}"}
    assert {a.all_text() for a in links} == {f"r{HOSTILE}"[:8]}
    assert {r.find_all("td")[1].all_text() for r in rows} == {f"d{HOSTILE}"}


def test_index_shows_hostile_grid_ids_as_text():
    counts = {"queued": 1, "running": 0, "finished": 2, "diverged": 0, "error": 0, "cancelled": 0}
    page = render_index([{"grid": f"id{HOSTILE}", **counts}])
    root = Tree(page).root
    assert not root.find_all("script") and not root.find_all("img") and "<script" not in page
    [link] = root.find_all("a")
    assert link.all_text() == f"id{HOSTILE}" and link.attrs["href"] == f"/grids/{quote(f'id{HOSTILE}', safe='')}/report"
    assert [td.all_text() for td in root.find_all("td")[1:]] == ["1", "0", "2", "0", "0", "0"]


@pytest.mark.parametrize("url", ["javascript:alert(1)//", "data:text/html,<script>alert(1)</script>", "/relative",
                                 "http:///no-host", "mlflow.example:5000"])
def test_a_link_base_that_is_not_http_is_refused(url, ablate_home):
    from tests.test_report import doc_for, grid_record, realistic_trials
    trials = realistic_trials()[:3]
    with pytest.raises(ValueError, match="must be an http:// or https:// address"):
        render_report(doc_for(trials), trials, grid_record(trials), mlflow_url=url)
    from tests.test_vocabulary import cli
    code, out = cli("report", "any-grid", "--mlflow-url", url)
    assert code == 2 and "must be an http:// or https:// address" in out["error"]


def test_served_report_and_index_escape_a_stored_grid(ablate_home):
    """A valid grid can carry markup in its data folder: the page built from the store shows it as text."""
    from orchestrator.api import create_app
    from orchestrator.service import GridService
    from orchestrator.state import StateStore
    from orchestrator.tracking import Tracker
    grid = {"name": "hostile-page", "dataset": "synthetic", "subset": 256, "recipe": "smoke", "depths": [8],
            "block": "basic", "width": 4, "variants": ["original", "full_preact"], "seeds": 1,
            "data_dir": f"/data/{HOSTILE}"}
    client = TestClient(create_app(GridService(store=StateStore(), tracker=Tracker()), mlflow_url=MLFLOW))
    r = client.post("/grids", content=json.dumps(grid))
    assert r.status_code == 201, r.text
    page = client.get(f"/grids/{r.json()['id']}/report").text
    root = assert_inert(page)
    spec = dict(zip((n.all_text() for n in root.find_all("dt")), (n.all_text() for n in root.find_all("dd"))))
    assert spec["data_dir"] == f"/data/{HOSTILE}"
    assert r.json()["id"] in Tree(client.get("/").text).root.find_all("a")[0].all_text()
