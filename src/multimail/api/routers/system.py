"""Health and readiness; the audit log routes live in ``routers.audit`` (included here)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from multimail.api.deps import get_services
from multimail.api.routers import audit as audit_routes
from multimail.services import health as health_service
from multimail.services.context import Services

router = APIRouter()
# The audit routes moved to their own module; including them here keeps app.py unchanged.
router.include_router(audit_routes.router)


@router.get("/health")
@router.get("/healthz", include_in_schema=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def ready(svc: Services = Depends(get_services)) -> JSONResponse:
    """503 while the database is unreachable or an expected worker role has gone quiet."""
    verdict = health_service.readiness(svc.db)
    return JSONResponse(
        {"status": "ready" if verdict.ready else "unavailable", "checks": verdict.checks},
        status_code=200 if verdict.ready else 503,
    )
