"""MultiMail: self-hosted email for AI agents, with graduated human oversight."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
