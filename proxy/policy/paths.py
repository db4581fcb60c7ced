"""Request-target path normalisation, as policy code names it.

The engine normalises every request's path once, before routing and authorization, on
every listener (`proxy.http.target`, where the rules and their options are
documented); `Request.path` is already normalised when a policy sees it. These names
are kept for code that normalises a path of its own (e.g. a path from configuration).
"""

from __future__ import annotations

from proxy.http.target import InvalidTarget as PathError
from proxy.http.target import normalize_path

__all__ = ["PathError", "normalize_path"]
