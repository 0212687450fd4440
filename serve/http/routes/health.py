"""`/healthz` (the process answers) and `/readyz` (the job store answers); not in the OpenAPI page."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from serve.http.deps import StateDep
from serve.http.errors import error_response

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> Response:
    try:
        await asyncio.to_thread(state.store.count_by_status)
    except Exception as error:  # the job store is the one thing the Ingress cannot work without
        return error_response(503, "not_ready", f"job store unavailable: {error}")
    return JSONResponse({"status": "ready"})
