"""`--dataplane` on the command line: choices, and the combinations refused."""

from __future__ import annotations

import pytest

from meshctl.main import main


def test_an_unknown_data_plane_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["sidecar", "--dataplane", "nginx", "--service", "a", "--app-port", "1"])
    assert exit_.value.code == 2
    assert "invalid choice: 'nginx'" in capsys.readouterr().err


def test_envoy_needs_mtls(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["--nats", "nats://127.0.0.1:1", "sidecar", "--dataplane", "envoy", "--no-mtls",
         "--service", "a", "--app-port", "1"]
    )  # fmt: skip
    assert code != 0
    assert "--dataplane envoy needs mTLS" in capsys.readouterr().err


def test_up_takes_a_data_plane_only_for_the_demo(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    code = main(["--state-dir", str(tmp_path), "up", "--dataplane", "envoy"])
    assert code != 0
    assert "--dataplane applies to the demo's proxies: add --demo" in capsys.readouterr().err


def test_every_sidecar_and_gateway_flag_has_help() -> None:
    import argparse

    from meshctl import sidecar_cmds

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    sidecar_cmds.add_parsers(sub)
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"meshctl {name} {action.option_strings[0]} has no help"


def test_envoy_on_demand_is_the_default_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from meshctl.main import build_parser

    base = ["sidecar", "--dataplane", "envoy", "--service", "a", "--app-port", "1"]
    monkeypatch.delenv("MESH_ENVOY_ON_DEMAND", raising=False)
    assert build_parser().parse_args(base).envoy_on_demand is True
    assert build_parser().parse_args([*base, "--no-envoy-on-demand"]).envoy_on_demand is False
    monkeypatch.setenv("MESH_ENVOY_ON_DEMAND", "0")
    assert build_parser().parse_args(base).envoy_on_demand is False
    assert build_parser().parse_args([*base, "--envoy-on-demand"]).envoy_on_demand is True


def test_envoy_telemetry_defaults_to_stats_and_takes_the_access_log(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshctl.main import build_parser

    monkeypatch.delenv("MESH_ENVOY_TELEMETRY", raising=False)
    for command in (
        ["sidecar", "--service", "a", "--app-port", "1"],
        ["gateway", "--port", "8080"],
    ):
        base = [*command, "--dataplane", "envoy"]
        assert build_parser().parse_args(base).envoy_telemetry == "stats"
        chosen = build_parser().parse_args([*base, "--envoy-telemetry", "access-log"])
        assert chosen.envoy_telemetry == "access-log"
    monkeypatch.setenv("MESH_ENVOY_TELEMETRY", "access-log")
    assert build_parser().parse_args(["gateway", "--port", "1"]).envoy_telemetry == "access-log"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway", "--port", "1", "--envoy-telemetry", "statsd"])
    assert "invalid choice: 'statsd'" in capsys.readouterr().err
