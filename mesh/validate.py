"""Small validators shared by every component: names, addresses, labels.

Each raises `BadRequest` naming the field path and the offending value.
"""

from __future__ import annotations

import re

from mesh.errors import BadRequest

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_INSTANCE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,126}[A-Za-z0-9])?")
_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def dns_label(value: str, field: str) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
        raise BadRequest(
            f"{field}: must be a DNS-1123 label (lower-case letters, digits, '-'), got {value!r}",
            field=field,
        )
    return value


def instance_id(value: str, field: str) -> str:
    if not isinstance(value, str) or not _INSTANCE.fullmatch(value):
        raise BadRequest(f"{field}: invalid instance id {value!r}", field=field)
    return value


def host_port(value: str, field: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(
            f"{field}: must be host:port with a port in 1..65535, got {value!r}", field=field
        )
    return host.strip("[]"), int(port)


def labels(value: dict[str, str], field: str) -> dict[str, str]:
    for k, v in value.items():
        if not _LABEL_KEY.fullmatch(k):
            raise BadRequest(f"{field}: invalid label key {k!r}", field=f"{field}.{k}")
        if not _LABEL_VALUE.fullmatch(v):
            raise BadRequest(f"{field}.{k}: invalid label value {v!r}", field=f"{field}.{k}")
    return value


def port(value: int, field: str) -> int:
    if not 0 < value < 65536:
        raise BadRequest(f"{field}: port must be in 1..65535, got {value}", field=field)
    return value
