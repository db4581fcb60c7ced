"""`-o table|json|yaml` against the real control plane (nats-server, etcd, registry and
config services): every read command prints the same document as JSON and as YAML,
a table for people by default, and refuses an unknown format with exit 2."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.messages import (
    Instance,
    ProxyStatus,
    RegisterReply,
    RegisterRequest,
    SubscriptionStatus,
)
from meshctl.main import main as meshctl
from tests.support import MeshHarness, destination_rule_yaml, eventually

pytestmark = pytest.mark.asyncio


async def test_read_commands_print_one_document_as_json_and_yaml(
    nats_server: Any,
    etcd_server: Any,
    prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix, ca=False) as mesh:
        flags = ["--nats", mesh.nats_url, "--prefix", mesh.prefix]

        async def run(*argv: str) -> tuple[int, str, str]:
            capsys.readouterr()
            code = await asyncio.to_thread(meshctl, [*argv, *flags])
            out = capsys.readouterr()
            return code, out.out, out.err

        await mesh.bus.request(
            mesh.bus.subjects.registry_register,
            RegisterRequest(
                instance=Instance(
                    namespace="default",
                    service="reviews",
                    instance="reviews-v1-test",
                    address="127.0.0.1:1",
                    version="v1",
                    labels={"app": "reviews", "version": "v1"},
                ),
                ttl=60,
            ),
            RegisterReply,
        )
        rules = tmp_path / "rules.yaml"
        rules.write_text(destination_rule_yaml("reviews"))
        code, out, err = await run("apply", "-f", str(rules), "-o", "yaml")
        assert code == 0, err
        applied = yaml.safe_load(out)
        assert [r["action"] for r in applied["results"]] == ["created"]
        await mesh.bus.publish(
            mesh.bus.subjects.proxy_status,
            ProxyStatus(
                proxy="productpage-v1-test",
                namespace="default",
                service="productpage",
                subscriptions=[
                    SubscriptionStatus(
                        subject=mesh.bus.subjects.route("default", "reviews"), revision=1
                    )
                ],
                sent_at=1.0,
            ),
        )

        async def reported() -> bool:
            code, out, _ = await run("proxy-status", "-o", "json")
            return code == 0 and len(json.loads(out)) == 1

        await eventually(reported)

        for argv, check in [
            (["version"], lambda d: d["name"] == "meshctl" and d["version"]),
            (["get", "endpoints"], lambda d: d["services"][0]["service"] == "reviews"),
            (["get", "dr", "reviews"], lambda d: d["kind"] == "DestinationRule"),
            (["proxy-status"], lambda d: d[0]["proxy"] == "productpage-v1-test"),
            (["analyze"], lambda d: isinstance(d, list)),
        ]:
            code, as_json, err = await run(*argv, "-o", "json")
            assert code == 0, (argv, err)
            code, as_yaml, err = await run(*argv, "-o", "yaml")
            assert code == 0, (argv, err)
            doc = json.loads(as_json)
            # the same document, but for how old a report is when each command ran
            assert _timeless(yaml.safe_load(as_yaml)) == _timeless(doc), argv
            assert check(doc), (argv, doc)
            # a table for people by default: not a document
            code, table, err = await run(*argv)
            assert code == 0 and table.strip(), (argv, err)
            if argv != ["version"]:
                with pytest.raises(json.JSONDecodeError):
                    json.loads(table)

        # every field of a row, defaults included: keys do not come and go with values
        code, out, _ = await run("proxy-status", "-o", "yaml")
        [row] = yaml.safe_load(out)
        assert list(row) == [
            "proxy", "namespace", "service", "subject", "applied_revision",
            "latest_revision", "state", "reason", "age_s", "summary",
        ]  # fmt: skip
        assert row["reason"] == "" and row["summary"].startswith(row["state"])

        with pytest.raises(SystemExit) as e:
            await run("get", "endpoints", "-o", "xml")
        assert e.value.code == 2
        assert "unknown output format 'xml'" in capsys.readouterr().err


def _timeless(doc: Any) -> Any:
    """`doc` without `age_s` (seconds since a report: it moves between two commands)."""
    if isinstance(doc, dict):
        return {k: _timeless(v) for k, v in doc.items() if k != "age_s"}
    if isinstance(doc, list):
        return [_timeless(v) for v in doc]
    return doc
