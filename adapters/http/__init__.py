"""HTTP transport: the pure translator, importable without aiohttp."""

from __future__ import annotations

from adapters.http.translate import BODY_LIMIT, HEADER_LIMIT, Body, Headers, SupportsItems, translate

__all__ = ["BODY_LIMIT", "HEADER_LIMIT", "Body", "Headers", "SupportsItems", "translate"]
