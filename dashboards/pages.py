"""HTML pages from the Jinja2 templates in dashboards/templates/, every printed value escaped.

Autoescaping is on for every template, so a string that came from a user (a grid's data folder, a variant
written in a spec, an MLflow address, a run id) is text wherever it lands, in an element or an attribute.
Only `Markup` passes unescaped, and the only Markup handed in is what Ablate draws itself: the plots' SVG.
"""
from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined

from ablations.vocabulary import STATUSES

_ENV = Environment(loader=PackageLoader("dashboards", "templates"), autoescape=True, undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render_page(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)


def check_link_base(url: str) -> str:
    """`url` when pages may link under it: http or https with a host (never javascript: or data:)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the MLflow URL must be an http:// or https:// address, got {url!r}")
    return url


def render_index(grids: list[dict[str, Any]]) -> str:
    """The service's grid list (`GET /`): one row of status counts per grid, each linking to its report;
    the page reloads itself every 5 s."""
    rows = [{"id": g["grid"], "href": f"/grids/{quote(str(g['grid']), safe='')}/report",
             "counts": [(s, g[s]) for s in STATUSES]} for g in grids]
    return render_page("index.html.j2", grids=rows, statuses=STATUSES, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
