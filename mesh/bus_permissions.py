"""Who may publish and subscribe where on NATS: the three roles of a mesh.

`meshctl up` writes these into nats-server's `authorization` block (one user per role,
random passwords in `cluster.json`); `deploy/` carries the same blocks for production
(`tests/integration/test_bus_security.py` checks they match).

- `admin` (`meshctl`, operators): publish and subscribe everything.
- `control` (registry, ca, config, telemetry): publish `<p>.>`, the JetStream API,
  acks and flow control (`$JS.>`) and the telemetry KV (`$KV.>`), and reply to any
  request it received (`allow_responses`); subscribe `<p>.>` and `_INBOX.>`.
- `sidecar` (sidecars and gateways): publish only `registry.register/deregister/
  heartbeat/get/vip`, `config.fetch`, `proxy.status`, `ca.sign`, `ca.bundle.get`,
  `ca.rotations.get` and `telemetry.>` (JetStream publish: a request whose ack comes
  to the inbox); subscribe
  only to endpoint events (`registry.endpoints.>`), route/inbound/gateway config
  (`config.route.>`, `config.inbound.>`, `config.gateway.>`), the mesh-wide config
  (`config.meshwide`), `ca.bundle`, `ca.rotate.>`
  and its own inbox.

A sidecar can never publish config (`config.route/inbound/gateway`), endpoint events,
the trust bundle or rotation notices (explicitly denied, on top of the allow list),
cannot answer a request (no `allow_responses`, no subscription to a request subject),
and cannot read replies addressed to the control plane or to `meshctl` (bootstrap
tokens travel in those): sidecars receive replies under their own inbox prefix,
`_INBOX_SIDECAR.<p>`, and may subscribe only there. They can read each other's
replies (configs, endpoints, certificates: nothing secret).

What this does not cover: a sidecar user may still register any instance and report
any proxy's status (the registry does not bind a registration to the caller's
certificate); mTLS keeps a forged endpoint from being trusted, not from being listed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

ROLES = ("admin", "control", "sidecar")


def sidecar_inbox(prefix: str) -> str:
    """Where a sidecar's replies go (`Bus.connect(inbox_prefix=...)`)."""
    return f"_INBOX_SIDECAR.{prefix}"


@dataclass(frozen=True)
class Permissions:
    publish_allow: tuple[str, ...]
    subscribe_allow: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    # may publish to the reply subject of a request it received (once)
    allow_responses: bool = False


def role_permissions(role: str, prefix: str) -> Permissions:
    p = prefix
    if role == "admin":
        return Permissions(publish_allow=(">",), subscribe_allow=(">",))
    if role == "control":
        return Permissions(
            # JetStream: stream/consumer API, acks and flow control, the telemetry KV
            publish_allow=(f"{p}.>", "$JS.>", "$KV.>"),
            subscribe_allow=(f"{p}.>", "_INBOX.>"),
            allow_responses=True,
        )
    if role == "sidecar":
        return Permissions(
            publish_allow=(
                f"{p}.registry.register",
                f"{p}.registry.deregister",
                f"{p}.registry.heartbeat",
                f"{p}.registry.get",
                f"{p}.registry.vip",
                f"{p}.config.fetch",
                f"{p}.proxy.status",
                f"{p}.ca.sign",
                f"{p}.ca.bundle.get",
                f"{p}.ca.rotations.get",
                # JetStream publish is a request on the subject; the ack comes to the inbox
                f"{p}.telemetry.>",
            ),
            publish_deny=(
                f"{p}.config.route.>",
                f"{p}.config.inbound.>",
                f"{p}.config.gateway.>",
                f"{p}.config.meshwide",
                f"{p}.registry.endpoints.>",
                f"{p}.ca.bundle",
                f"{p}.ca.rotate.>",
                f"{p}.proxy.status.request",
                f"{p}.registry.resync",
            ),
            subscribe_allow=(
                f"{p}.registry.endpoints.>",
                f"{p}.config.route.>",
                f"{p}.config.inbound.>",
                f"{p}.config.gateway.>",
                f"{p}.config.meshwide",
                f"{p}.ca.bundle",
                f"{p}.ca.rotate.>",
                f"{p}.proxy.status.request",
                f"{p}.registry.resync",
                f"{sidecar_inbox(p)}.>",
            ),
        )
    raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


def _list(items: tuple[str, ...]) -> str:
    if len(items) <= 3:
        return "[" + ", ".join(json.dumps(s) for s in items) + "]"
    return "[\n" + "".join(f"      {json.dumps(s)},\n" for s in items) + "    ]"


def permissions_conf(role: str, prefix: str) -> str:
    """The role's permissions as a nats-server config variable, `<ROLE>_PERMISSIONS = {...}`."""
    perms = role_permissions(role, prefix)
    publish = f"allow = {_list(perms.publish_allow)}"
    if perms.publish_deny:
        publish += f"\n    deny = {_list(perms.publish_deny)}"
    lines = [
        f"{role.upper()}_PERMISSIONS = {{",
        f"  publish = {{\n    {publish}\n  }}",
        f"  subscribe = {{\n    allow = {_list(perms.subscribe_allow)}\n  }}",
    ]
    if perms.allow_responses:
        lines.append("  allow_responses = true")
    lines.append("}")
    return "\n".join(lines)


def _value(text: str) -> str:
    """A `$VARIABLE` reference as is (environment, in deploy/); anything else quoted."""
    return (
        text if text.startswith("$") and text[1:].replace("_", "").isalnum() else json.dumps(text)
    )


def authorization_conf(prefix: str, users: Mapping[str, tuple[str, str]]) -> str:
    """nats-server config: the role permissions and an `authorization` block with one
    user per role (`users`: role -> (user, password))."""
    blocks = [permissions_conf(role, prefix) for role in ROLES if role in users]
    entries = [
        f"    {{user: {_value(user)}, password: {_value(password)}, "
        f"permissions: ${role.upper()}_PERMISSIONS}}"
        for role in ROLES
        if role in users
        for user, password in [users[role]]
    ]
    return (
        "\n\n".join([*blocks, "authorization {\n  users = [\n" + "\n".join(entries) + "\n  ]\n}"])
        + "\n"
    )
