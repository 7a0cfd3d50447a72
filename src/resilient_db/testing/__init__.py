"""Test helpers for exercising database resilience (fault-injection proxy)."""

from resilient_db.testing.proxy import Fault, FaultProxy

__all__ = ["Fault", "FaultProxy"]
