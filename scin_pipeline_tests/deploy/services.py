"""Start and stop the deployment's services as plain local processes: PostgreSQL, Dagster code servers,
the webserver, the daemon and the MLflow tracking server. The fixtures in ``conftest.py`` compose them;
docs/deployment-local.md gives the same commands for a person to run by hand.

Decisions:
- PostgreSQL is a throw-away cluster (``initdb`` into a temporary folder, ``pg_ctl start``/``stop -m
  fast``) on a free loopback port, never the machine's own cluster. PostgreSQL refuses to run as root, so
  as root the cluster belongs to the ``postgres`` system user (``nobody`` where there is none). Durability
  is switched off (``fsync=off``, ``initdb --no-sync``): the data dies with the test.
- Every other service runs in its own session (``start_new_session=True``) and is stopped by signalling
  its whole process group: ``dagster`` processes spawn children (code-server proxies, run workers, step
  processes) and some of them ignore SIGTERM, so SIGTERM comes first and SIGKILL after a grace period;
  any descendant that escaped the group is killed by pid.
- Readiness is polled over HTTP (``/server_info``, ``/health``, GraphQL) or TCP, never slept for.
- Own code rather than a library (testing.postgresql, pytest-postgresql): those cannot drop root
  privileges for ``initdb`` and pull in more than the hundred lines below.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

CHROMIUM = "/usr/bin/chromium"
POSTGRES_SUPERUSER = "scin"


def ci_is_set() -> bool:
    """CI=true (and any value but empty/0/false): a missing system package is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chromium_path() -> str | None:
    """Debian's Chromium (the package `chromium`); never a browser that Playwright downloads."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium")


def postgres_bin_dir() -> Path | None:
    """The folder of initdb/pg_ctl/postgres: on PATH, else Debian's /usr/lib/postgresql/<major>/bin
    (the newest). Debian puts only wrapper scripts in /usr/bin, and no initdb at all."""
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).resolve().parent / "initdb").exists():
        return Path(on_path).resolve().parent
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    candidates = [c for c in candidates if (c / "initdb").exists() and (c / "postgres").exists()]
    if not candidates:
        return None
    return max(candidates, key=lambda c: int(c.parent.name) if c.parent.name.isdigit() else -1)


# ----------------------------------------------------------------------------------------- waiting


class ServiceError(RuntimeError):
    """A service did not come up; the message carries the tail of its log."""


def wait_until(check, *, timeout_s: float, what: str, services: list[Service] = (), interval_s: float = 0.5):
    """Poll ``check()`` until it returns a truthy value; fail early when one of ``services`` exits."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        for service in services:
            if service.proc.poll() is not None:
                raise ServiceError(
                    f"{service.name} exited with status {service.proc.returncode} while "
                    f"waiting for {what}; log {service.log_path}:\n{service.log_tail()}"
                )
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet: connection refused, 502, a location still loading
            last_error = exc
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {s.name} ({s.log_path}):\n{s.log_tail()}" for s in services)
            raise ServiceError(
                f"timed out after {timeout_s:.0f} s waiting for {what}"
                f"{f' (last error: {last_error})' if last_error else ''}{tails}"
            )
        time.sleep(interval_s)


def http_get(url: str, timeout_s: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read()


def tcp_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


class GraphQLError(RuntimeError):
    pass


def graphql(url: str, query: str, variables: dict | None = None, timeout_s: float = 60) -> dict:
    """POST a GraphQL document to ``url`` (the webserver's /graphql); the ``data`` member, or raise."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise GraphQLError(f"{url}: HTTP {exc.code}: {exc.read()[:2000]!r}") from None
    if payload.get("errors"):
        raise GraphQLError(f"{url}: {json.dumps(payload['errors'])[:2000]}")
    return payload["data"]


# ----------------------------------------------------------------------------------------- processes


@dataclass
class Service:
    """One started process (and its process group)."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    _log_handle: object = field(default=None, repr=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 10) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; then any escaped descendant."""
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        try:  # a group leader that exited can leave members behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(descendants, timeout=10)
        if self._log_handle is not None:
            self._log_handle.close()


def start_service(name: str, argv: list[str], *, env: dict, log_dir: Path, cwd: Path) -> Service:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    handle = open(log_path, "ab")
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return Service(name=name, proc=proc, log_path=log_path, _log_handle=handle)


# ----------------------------------------------------------------------------------------- PostgreSQL


@dataclass
class PostgresCluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<port>, password authentication over TCP."""

    bin_dir: Path
    root: Path
    port: int
    password: str
    os_user: str | None  # the user the server runs as when we are root; None: ourselves
    user: str = POSTGRES_SUPERUSER

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str, scheme: str = "postgresql") -> str:
        return f"{scheme}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, argv: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.os_user is not None:
            entry = pwd.getpwnam(self.os_user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.root)}
        result = subprocess.run(
            argv, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout_s, **kwargs
        )
        if result.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            raise ServiceError(
                f"{' '.join(argv[:2])} failed ({result.returncode}): {result.stdout}{result.stderr}\n{log}"
            )
        return result

    def start(self) -> None:
        (self.root / "pwfile").write_text(self.password + "\n")
        (self.root / "sockets").mkdir()
        if self.os_user is not None:
            entry = pwd.getpwnam(self.os_user)
            for path in (self.root, self.root / "pwfile", self.root / "sockets"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        (self.root / "pwfile").chmod(0o600)
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={self.root / 'pwfile'}",
                "--no-sync",
                "--no-instructions",
            ]
        )
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root / 'sockets'} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ]
        )

    def stop(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"])
        except (ServiceError, subprocess.TimeoutExpired):
            # pg_ctl could not stop it: the postmaster's pid is the file's first line; SIGQUIT is
            # PostgreSQL's immediate shutdown, and it takes its backends with it.
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
            except (OSError, ValueError, IndexError):
                pass
            raise

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            connect_timeout=10,
        )

    def create_database(self, name: str) -> None:
        connection = self.connect()
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        connection = self.connect(database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()


def start_postgres(bin_dir: Path, databases: list[str]) -> PostgresCluster:
    """initdb + start a cluster in a new folder under the system temp dir (reachable by the server's user:
    pytest's own tmp folders are private to root); create ``databases``."""
    os_user = None
    if os.geteuid() == 0:
        for candidate in ("postgres", "nobody"):
            try:
                pwd.getpwnam(candidate)
                os_user = candidate
                break
            except KeyError:
                continue
        if os_user is None:
            raise ServiceError(
                "running as root and neither a 'postgres' nor a 'nobody' user exists: PostgreSQL refuses to run as root"
            )
    root = Path(tempfile.mkdtemp(prefix="scin-postgres-"))
    cluster = PostgresCluster(
        bin_dir=bin_dir, root=root, port=free_port(), password=secrets.token_urlsafe(18), os_user=os_user
    )
    try:
        cluster.start()
        for name in databases:
            cluster.create_database(name)
    except BaseException:
        stop_postgres(cluster)
        raise
    return cluster


def stop_postgres(cluster: PostgresCluster) -> None:
    try:
        cluster.stop()
    finally:
        shutil.rmtree(cluster.root, ignore_errors=True)
