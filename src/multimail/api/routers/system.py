"""Health and readiness; the audit log routes live in ``routers.audit`` (included here)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from multimail.api.deps import get_services
from multimail.api.routers import audit as audit_routes
from multimail.services.context import Services

router = APIRouter()
# The audit routes moved to their own module; including them here keeps app.py unchanged.
router.include_router(audit_routes.router)


@router.get("/health")
@router.get("/healthz", include_in_schema=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def ready(request: Request, svc: Services = Depends(get_services)) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with svc.db.read() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # readiness reports any failure instead of raising
        checks["database"] = f"unavailable: {exc.__class__.__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
    )
