"""Routes for links (see the module's owner in docs/architecture.md)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
