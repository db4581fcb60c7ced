"""What `meshctl up` says it resumed, and what `--fresh`/`down --purge` remove."""

from __future__ import annotations

from pathlib import Path

from meshctl.cluster_state import describe_kept, purge, resource_kinds


def test_resources_are_counted_by_kind_without_the_change_marker() -> None:
    keys = [
        "/mesh/resources/VirtualService/default/reviews",
        "/mesh/resources/VirtualService/default/ratings",
        "/mesh/resources/AuthorizationPolicy/default/deny",
        "/mesh/resources/.changed",
        "/mesh/registry/default/reviews/r-1",
    ]
    kinds = resource_kinds(keys, "/mesh/")
    assert kinds == {"VirtualService": 2, "AuthorizationPolicy": 1}
    line = describe_kept(kinds, Path(".mesh"))
    assert "3 resource(s) from before (1 AuthorizationPolicy, 2 VirtualService)" in line
    assert "meshctl up --fresh" in line and "meshctl down --purge" in line


def test_purge_removes_only_what_up_created(tmp_path: Path) -> None:
    (tmp_path / "data" / "etcd").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    (tmp_path / "ca-kek").write_text("k")
    (tmp_path / "notes.txt").write_text("the user's")  # a state dir the user named
    assert purge(tmp_path) == ["data", "logs", "ca-kek"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "data").mkdir()
    purge(tmp_path)
    assert not tmp_path.exists()  # emptied: removed
