"""Faiss-backed modular memory: slot store, routing into modules, the module graph, the bank.

Imports nothing from `mempos.agent` (data flows agent -> memory).
"""

from .bank import FORMAT_VERSION, MemoryBank
from .router import Router
from .store import INDEX_KINDS, META_FIELDS, METRICS, Slot, SlotStore

__all__ = ["FORMAT_VERSION", "INDEX_KINDS", "META_FIELDS", "METRICS", "MemoryBank", "Router", "Slot", "SlotStore"]
