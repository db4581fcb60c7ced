"""The downstream request as the engine hands it to a handler."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from .body import BodyStream


@dataclass(slots=True, eq=False)
class Request:
    """A request head plus its body stream.

    `target` is the raw request-target; `path` the origin-form path with query (the
    URI's path for absolute-form, "*" for asterisk-form, "" for CONNECT). `authority`
    comes from an absolute-form URI, else from the Host header. Header names are
    lower-case, in wire order, duplicates kept. `upgrade` is the Upgrade header's value
    when the request is a valid upgrade (Upgrade plus `Connection: upgrade`), else None.
    """

    method: str
    target: str
    absolute_form: bool
    scheme: str
    authority: str
    path: str
    headers: list[tuple[str, str]]
    http_version: str
    keep_alive: bool
    upgrade: str | None
    peer: tuple[str, int]
    local: tuple[str, int]
    ssl_object: ssl.SSLObject | None
    content_length: int | None
    chunked: bool
    body: BodyStream
