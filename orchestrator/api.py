"""HTTP API of `ablate serve` (FastAPI). Routes call the domain functions; nothing here trains or computes.

Bad input answers 4xx with a JSON `detail`, never 500: bodies over the size limit 413, a missing or
wrong bearer token 401 (when ABLATE_TOKEN is set), an invalid grid 422 with the field and reason, an
unknown grid 404, a question the grid cannot answer 400.
"""
from __future__ import annotations

import secrets
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from ablations.vocabulary import METRICS
from dashboards import DEFAULT_DESIGN, DESIGNS
from dashboards.pages import render_index

from .grids import GridError, GridSpec, expand_grid, parse_grid_text
from .results import METRICS, BadRequest, NotFound, comparison, grid_status, seed_plan
from .service import GridService

MAX_BODY_BYTES = 1_000_000


def create_app(service: GridService, token: str | None = None, mlflow_url: str | None = None) -> FastAPI:
    app = FastAPI(title="Ablate", version="1", description="Residual-unit ablation grids on Ray, tracked in MLflow.")
    store = service.store

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorised)]

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(GridError)
    async def bad_grid(request: Request, exc: GridError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    body_schema = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/GridSpec"}},
        "application/yaml": {"schema": {"type": "string"}}}}}

    @app.post("/grids", status_code=201, dependencies=auth, openapi_extra=body_schema,
              responses={413: {"description": "body too large"}, 422: {"description": "invalid grid"}})
    async def submit(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise HTTPException(413, f"a grid is at most {MAX_BODY_BYTES} bytes")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"a grid is at most {MAX_BODY_BYTES} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(400, "the body is not UTF-8 text") from None
        # Reading, expanding and recording a grid take up to seconds for a large one: on a worker thread,
        # so that the event loop goes on answering every other request meanwhile.
        return await run_in_threadpool(accept, text)

    def accept(text: str) -> dict[str, Any]:
        spec = parse_grid_text(text)
        trials = len(expand_grid(spec, tuned=store.tuned_recipes()))
        return {"id": service.submit(spec), "trials": trials}

    @app.get("/grids", dependencies=auth)
    def grids() -> list[dict[str, Any]]:
        return [grid_status(store, row.id) for row in store.grids()]

    @app.get("/grids/{grid_id}", dependencies=auth, responses={404: {"description": "no such grid"}})
    def status(grid_id: str) -> dict[str, Any]:
        return grid_status(store, grid_id)

    @app.delete("/grids/{grid_id}", dependencies=auth, responses={404: {"description": "no such grid"}})
    def cancel(grid_id: str) -> dict[str, Any]:
        grid_status(store, grid_id)
        cancelled = store.cancel_grid(grid_id)
        return {**grid_status(store, grid_id), "cancelled_queued": cancelled}

    @app.get("/grids/{grid_id}/comparison", dependencies=auth,
             responses={400: {"description": "unknown metric or baseline"}, 404: {"description": "no such grid"}})
    def compare(grid_id: str, metric: Literal[METRICS] = "test_error",
                baseline: str | None = Query(None, max_length=64),
                design: Literal[DESIGNS] = DEFAULT_DESIGN) -> dict[str, Any]:
        return comparison(store, grid_id, metric, baseline, design)

    @app.get("/grids/{grid_id}/plan", dependencies=auth,
             responses={400: {"description": "unknown baseline"}, 404: {"description": "no such grid"}})
    def plan(grid_id: str, delta: float = Query(gt=0, le=100, description="the difference to decide, in points"),
             power: float = Query(0.8, ge=0.5, lt=1), alpha: float = Query(0.05, gt=0, lt=0.5),
             baseline: str | None = Query(None, max_length=64)) -> dict[str, Any]:
        return seed_plan(store, grid_id, delta, power, alpha, baseline)

    @app.get("/grids/{grid_id}/report", dependencies=auth, response_class=HTMLResponse,
             responses={404: {"description": "no such grid"}})
    def report(grid_id: str) -> HTMLResponse:
        from .reporting import grid_report
        return HTMLResponse(grid_report(store, grid_id, mlflow_url))

    @app.get("/", dependencies=auth, response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(render_index([grid_status(store, row.id) for row in store.grids()]))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            grid_schema = GridSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(grid_schema.pop("$defs", {}))
            components["GridSpec"] = grid_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
