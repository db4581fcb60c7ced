"""`make bench`: every benchmark, then one summary table and bench/results/summary.json."""

from __future__ import annotations

from bench import convergence, dataplane, telemetry
from bench.common import print_rows, write_result


def main() -> None:
    data = dataplane.main(["--seconds", "5", "--repeats", "3"])
    control = convergence.main([])
    ingest = telemetry.main([])
    summary = {"dataplane": data, "control_plane": control, "telemetry": ingest}
    write_result("summary", summary)
    rows = [
        ("requests/s ratio sidecar pair / direct", str(data["rps_ratio_sidecar_over_direct"])),
        ("added latency p50 / p99 (ms)", f"{data['added_p50_ms']} / {data['added_p99_ms']}"),
        (
            "requests/s ratio telemetry on / off (A/B)",
            str(data["ab_rps_ratio_telemetry_on_over_off"]),
        ),
        (
            "sidecar pair CPU us/request: telemetry's share",
            str(data["telemetry_sidecar_cpu_us_per_request"]),
        ),
        ("telemetry ingest: requests counted/s", str(ingest["requests_counted_per_s"])),
        ("telemetry ingest: access records/s", str(ingest["access_records_per_s"])),
    ]
    for c in control["convergence"]:  # type: ignore[attr-defined]
        rows.append((f"apply -> {c['proxies']} proxies SYNCED p99 (ms)", str(c["synced_p99_ms"])))
    print_rows("summary (bench/results/summary.json)", rows)


if __name__ == "__main__":
    main()
