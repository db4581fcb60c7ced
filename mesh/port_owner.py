"""Who listens on a TCP port: for errors that name the flag, the port and its holder
(`--admin-port 15000 is in use by pid 4242 (python3 app.py)`) instead of a traceback.

Linux: the listening socket's inode from /proc/net/tcp{,6}, then the process holding
that inode among /proc/<pid>/fd (only processes of this user are visible unless root);
`ss -ltnp` when /proc says nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

TCP_LISTEN = "0A"


def listening_inodes(port: int, proc: Path = Path("/proc")) -> set[str]:
    """Socket inodes listening on `port` (any address, IPv4 or IPv6)."""
    inodes: set[str] = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != TCP_LISTEN:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port:
                inodes.add(fields[9])
    return inodes


def _command(pid: int, proc: Path) -> str:
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    return " ".join(text.split())[:120]  # one line, whatever the arguments hold


def holders_from_proc(port: int, proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, command line) of each process holding a socket listening on `port`."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port, proc)}
    if not wanted:
        return []
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(entry / "fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in wanted:
                        found.append((int(entry.name), _command(int(entry.name), proc)))
                        break
    return sorted(found)


def _holders_from_ss(port: int) -> list[tuple[int, str]]:
    ss = shutil.which("ss")
    if ss is None:
        return []
    try:
        out = subprocess.run(
            [ss, "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=3
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({(int(pid), name) for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', out)})


def describe_holder(port: int) -> str:
    """` by pid N (command)`, or "" when the holder cannot be known (another user's)."""
    holders = holders_from_proc(port) or _holders_from_ss(port)
    if not holders:
        return ""
    return " by " + ", ".join(
        f"pid {pid} ({command})" if command else f"pid {pid}" for pid, command in holders
    )


def in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether another socket holds `port` (EADDRINUSE; connections in TIME_WAIT do not
    count, as servers set SO_REUSEADDR; a port we may not bind is another error)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def port_in_use(flag: str, port: int, host: str = "127.0.0.1") -> str | None:
    """An error naming `flag`, `port` and who holds it, if `port` is taken; None if it
    is free (or 0: any port)."""
    if port == 0 or not in_use(port, host):
        return None
    return f"{flag} {port} is in use{describe_holder(port)}"
