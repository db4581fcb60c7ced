"""`--intercept`, `--capture-port` and `meshctl intercept-init` on the command line:
the combinations refused before anything starts, each with the flag it is about."""

from __future__ import annotations

import pytest

from meshctl.main import main
from proxy.intercept.rules import InterceptSettings, PodSettings, pod_ruleset

SIDECAR = ["--nats", "nats://127.0.0.1:1", "sidecar", "--no-mtls", "--service", "a"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app-port", "1", "--exclude-ports", "22"], "--exclude-ports only apply with"),
        (
            ["--app-port", "1", "--intercept", "--capture-port", "15001", "--", "true"],
            "exclude each other",
        ),
        (["--app-port", "1", "--dns-port", "15053"], "--dns-port belongs to the pod form"),
        (
            ["--app-port", "1", "--capture-port", "15001", "--exclude-ports", "22"],
            "--exclude-ports: pass them to `meshctl intercept-init`",
        ),
        (["--app-port", "1", "--capture-port", "70000"], "--capture-port must be in 1..65535"),
        (["--app-port", "1", "--intercept"], "--intercept needs the app's command"),
        (
            ["--app-port", "1", "--intercept", "--opaque-ports", "x", "--", "true"],
            "--opaque-ports: 'x' is not a port",
        ),
    ],
)
def test_sidecar_interception_flags_refused(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main([*SIDECAR, *args]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_up_takes_intercept_only_for_the_demo(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    assert main(["--state-dir", str(tmp_path), "up", "--intercept"]) != 0
    assert "--intercept applies to the demo's apps: add --demo" in capsys.readouterr().err


def test_intercept_init_prints_the_pod_ruleset(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["intercept-init", "--inbound-ports", "9080", "--proxy-uid", "1337",
         "--exclude-outbound-cidrs", "169.254.169.254/32", "--print"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    expected = pod_ruleset(
        PodSettings(
            capture_port=15001,
            inbound_port=15006,
            inbound_ports=(9080,),
            proxy_uid=1337,
            dns_port=15053,
            intercept=InterceptSettings(exclude_outbound_cidrs=("169.254.169.254/32",)),
        )
    )
    assert out == expected


def test_intercept_init_needs_the_proxys_identity(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["intercept-init", "--inbound-ports", "9080", "--print"]) != 0
    assert "--proxy-uid, --proxy-gid or --proxy-mark" in capsys.readouterr().err
