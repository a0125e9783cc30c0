"""The shared servers, started for real on loopback: PostgreSQL, a Prefect server and an MLflow server on it, and
an S3-compatible object store (moto's server) holding MLflow's artifacts and the DVC remote.

The same stack as infra/compose.yaml, without a container engine: PostgreSQL from the Debian package (initdb and
postgres from /usr/lib/postgresql/*/bin, run as the `postgres` user when we are root: it refuses to run as root),
Prefect and MLflow from the project's venv, moto from the lock's test group. Everything listens on 127.0.0.1 on
free ports, keeps its files in temporary folders, and is hardened as the compose file is: Prefect's basic auth
(PREFECT_SERVER_API_AUTH_STRING), MLflow's basic-auth app with an admin password from the environment (random
here), `--allowed-hosts`, model-version source validation, and proxied artifacts (clients hold no S3 key for
MLflow). Each server runs in its own process group and gets SIGTERM (PostgreSQL: SIGINT, its fast shutdown) when
the stack stops, on success, on failure and at interpreter exit; each also dies with the process that started it
(PR_SET_PDEATHSIG), so a killed test run leaves nothing listening.

    with server_stack() as stack:          # or the session fixture `servers` (tests/test_servers.py)
        env = {**os.environ, **stack.env}  # PREFECT_API_URL, MLFLOW_TRACKING_URI, their credentials, AWS keys
        stack.dvc_remote(project)          # the project's default DVC remote: the S3 bucket (local config)

By hand, to try the README's walk-through: `.venv/bin/python tests/servers.py` starts the stack, prints the
variables to export and stops everything on Ctrl-C.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
DB_USER = "instructflow"
MLFLOW_ADMIN = "admin"
MLFLOW_BUCKET, DVC_BUCKET = "mlflow", "dvc"
# what a registered version's source may be: a logged model, a run's artifacts or the server's proxied store
# (a client cannot register a version whose files are, say, file:///etc on the server's disk)
SOURCE_REGEX = r"^(models:/m-[0-9a-f]+$|runs:/[0-9a-f]+/|mlflow-artifacts:/)"
# variables of the caller's environment that would point a server or client elsewhere
FOREIGN = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
           "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
           "INSTRUCTFLOW_PARENT_RUN_ID",
           "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


class Unavailable(RuntimeError):
    """A system package the stack needs is missing (the tests skip, naming it and how to install it)."""


def free_port() -> int:
    """A TCP port free on loopback right now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path:
    """The newest PostgreSQL server binaries (the Debian package's), or Unavailable saying how to get them."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    if shutil.which("initdb") and shutil.which("postgres"):
        return Path(shutil.which("initdb")).parent
    raise Unavailable("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb): run "
                      "`sh infra/system-packages.sh` (apt-get install postgresql)")


def _own_folder(prefix: str, exits: ExitStack) -> Path:
    """A new folder in the system temp dir, removed on the way out; it records its owner's PID, so that a folder
    left by a process killed outright (SIGKILL, where no cleanup runs) is removed by the next stack."""
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            pid = int((stale / "owner.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (OSError, ValueError):  # no pid yet (being created), or not ours to signal: leave it
            pass
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    (folder / "owner.pid").write_text(str(os.getpid()))
    exits.callback(shutil.rmtree, folder, True)
    return folder


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def ask_to_stop(self) -> None:
        """Send its process group the stop signal (no wait)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, self.stop_signal)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15) -> None:
        """Stop its process group: the stop signal, then SIGKILL after `timeout` seconds."""
        self.ask_to_stop()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def stop_all(servers: list[Server]) -> None:
    """Stop the clients of PostgreSQL together (each takes a few seconds to drain), then PostgreSQL."""
    clients = [s for s in servers if s.name != "postgres"]
    for server in clients:
        server.ask_to_stop()
    for server in (*clients, *(s for s in servers if s.name == "postgres")):
        server.stop()


@dataclass
class Stack:
    """Where the servers listen and what a client sets to use them (`env`: no secret appears anywhere else)."""

    folder: Path
    postgres_url: str  # postgresql://user:password@127.0.0.1:port (append /database)
    prefect_api_url: str
    mlflow_url: str
    s3_endpoint: str
    env: dict[str, str]
    servers: list[Server] = field(default_factory=list)
    _starter: "_Starter | None" = field(default=None, repr=False)

    @property
    def dvc_remote_url(self) -> str:
        return f"s3://{DVC_BUCKET}/store"

    def dvc_remote(self, project: Path, name: str = "team") -> None:
        """Make the S3 bucket the project's default DVC remote, in .dvc/config.local (not versioned; the
        credentials stay in the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""
        dvc = [sys.executable, "-m", "dvc", "remote"]
        for args in (["add", "--local", "--force", "-d", name, self.dvc_remote_url],
                     ["modify", "--local", name, "endpointurl", self.s3_endpoint]):
            subprocess.run(dvc + args, cwd=project, check=True, capture_output=True, text=True)

    def server(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)

    def worker(self, pool: str, cwd: Path, env: dict[str, str] | None = None, worker_type: str = "process") -> Server:
        """A Prefect worker polling `pool` (created if missing) from `cwd`, stopped with the stack (before the
        servers it talks to); `env` is added to the stack's client variables."""
        env = {**self._starter.base_env, **self.env, **(env or {})}
        server = self._starter.spawn(f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool", pool,
                                                        "--type", worker_type], env, cwd=cwd)
        _wait(server, lambda: "started!" in server.log.read_text(errors="replace"),  # "Worker '...' started!"
              f"the worker for pool {pool!r}", 90)
        return server


def _wait(server: Server, ready, what: str, timeout: float) -> None:
    """Poll `ready()` until it is true; fail with the server's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} before {what} answered; its log "
                               f"({server.log}):\n{server.tail()}")
        try:
            if ready():
                return
        except Exception:  # not up yet: refused, reset, not ready
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{server.name}: {what} did not answer within {timeout:.0f} s; its log ({server.log}):\n"
                       f"{server.tail()}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


class _Starter:
    def __init__(self, folder: Path):
        self.folder = folder
        self.servers: list[Server] = []
        self.base_env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
        self.base_env.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                              "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                              "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})

    def spawn(self, name: str, cmd: list[str], env: dict[str, str], stop_signal: int = signal.SIGTERM,
              user: pwd.struct_passwd | None = None, cwd: Path | None = None) -> Server:
        log = self.folder / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd or self.folder, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
                                    **ids)
        server = Server(name, proc, log, stop_signal)
        self.servers.append(server)
        return server

    def postgres(self, password: str, home: Path) -> str:
        """PostgreSQL with its data in `home` (a folder of its own under the system temp dir: pytest's folders are
        private to their user, and the server's user must reach its data)."""
        bindir = postgres_bin()
        user = None
        if os.geteuid() == 0:  # PostgreSQL refuses root: the package's system user runs it
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("no `postgres` system user to run PostgreSQL as (we are root): run "
                                  "`sh infra/system-packages.sh` (apt-get install postgresql)") from None
        data, pwfile = home / "data", home / "pw"
        pwfile.write_text(password)
        if user:
            os.chmod(home, 0o700)
            for path in (home, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        done = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}",
                               "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                              env=self.base_env, cwd=home, capture_output=True, text=True, **ids)
        pwfile.unlink()
        if done.returncode:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        port = free_port()
        # a throwaway cluster: no fsync (a crash loses nothing we keep); TCP on loopback only, no Unix socket
        server = self.spawn("postgres", [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                                         "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                                         "-c", "fsync=off", "-c", "synchronous_commit=off",
                                         "-c", "full_page_writes=off"],
                            self.base_env, stop_signal=signal.SIGINT, user=user, cwd=home)
        import psycopg

        def connect():
            return psycopg.connect(host="127.0.0.1", port=port, user=DB_USER, password=password, dbname="postgres",
                                   connect_timeout=2, autocommit=True)

        _wait(server, lambda: connect().close() is None, f"PostgreSQL on 127.0.0.1:{port}", 60)
        with connect() as conn:
            for db in ("prefect", "mlflow", "mlflow_auth"):
                conn.execute(f"CREATE DATABASE {db}")
        return f"postgresql://{DB_USER}:{password}@127.0.0.1:{port}"

    def s3(self, key: str, secret: str) -> str:
        port = free_port()
        server = self.spawn("s3", [sys.executable, "-c", "from moto.server import main; main()",
                                   "-H", "127.0.0.1", "-p", str(port)], self.base_env)
        endpoint = f"http://127.0.0.1:{port}"
        _wait(server, lambda: _http_ok(f"{endpoint}/moto-api/data.json"), f"the S3 server on {endpoint}", 60)
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                          region_name="us-east-1")
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            s3.create_bucket(Bucket=bucket)
        return endpoint

    def prefect(self, pg: str, auth: str) -> tuple[Server, str]:
        port = free_port()
        env = {**self.base_env, "PREFECT_HOME": str(self.folder / "prefect-home"),
               "PREFECT_API_DATABASE_CONNECTION_URL": f"{pg.replace('postgresql:', 'postgresql+asyncpg:')}/prefect",
               "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_UI_ENABLED": "false"}
        server = self.spawn("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                        "--port", str(port)], env)
        return server, f"http://127.0.0.1:{port}/api"

    def mlflow(self, pg: str, admin_password: str, flask_key: str, s3: str, key: str, secret: str
               ) -> tuple[Server, str]:
        port = free_port()
        auth_ini = self.folder / "mlflow-auth.ini"  # names the auth database (with its password): 0600, temporary
        auth_ini.touch(0o600)
        auth_ini.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = {pg}/mlflow_auth\n"
                            f"admin_username = {MLFLOW_ADMIN}\n"
                            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                            # a password check (PBKDF2) costs ~0.3 s here: logging a model makes ~50 requests
                            "auth_cache_ttl_seconds = 60\n")
        env = {**self.base_env, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_key,  # signs the auth app's CSRF tokens
               "MLFLOW_BACKEND_STORE_URI": f"{pg}/mlflow",  # (with its password: in the environment, not in `ps`)
               "MLFLOW_S3_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
               "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX": SOURCE_REGEX}
        server = self.spawn("mlflow", [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
                                       "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                       "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
                                       "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"], env)
        return server, f"http://127.0.0.1:{port}"


@contextmanager
def server_stack(folder: Path | None = None) -> Iterator[Stack]:
    """Start the stack (about 15-25 s on 2 cores); stop every server on the way out, whatever happens."""
    with ExitStack() as exits:
        if folder is None:
            folder = _own_folder("instructflow-servers-", exits)
        folder.mkdir(parents=True, exist_ok=True)
        pg_home = _own_folder("instructflow-pg-", exits)
        starter = _Starter(folder)
        exits.callback(stop_all, starter.servers)  # first on the way out: the servers, then their folders
        atexit.register(exits.close)  # a run that ends without unwinding (sys.exit in a thread, ...) still stops them
        names = ("pg", "prefect", "mlflow", "flask", "s3_key", "s3_secret")
        secret = {name: secrets.token_urlsafe(18) for name in names}
        pg = starter.postgres(secret["pg"], pg_home)
        s3 = starter.s3(secret["s3_key"], secret["s3_secret"])
        prefect_auth = f"instructflow:{secret['prefect']}"
        # Prefect and MLflow start side by side: each takes 10-20 s, mostly imports and database migrations
        prefect, prefect_url = starter.prefect(pg, prefect_auth)
        mlflow, mlflow_url = starter.mlflow(pg, secret["mlflow"], secret["flask"], s3, secret["s3_key"],
                                            secret["s3_secret"])
        _wait(prefect, lambda: _http_ok(f"{prefect_url}/health"), f"the Prefect API on {prefect_url}", 120)
        _wait(mlflow, lambda: _http_ok(f"{mlflow_url}/health"), f"the MLflow server on {mlflow_url}", 120)
        env = {"PREFECT_API_URL": prefect_url, "PREFECT_API_AUTH_STRING": prefect_auth,
               "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
               "MLFLOW_TRACKING_PASSWORD": secret["mlflow"],
               "AWS_ACCESS_KEY_ID": secret["s3_key"], "AWS_SECRET_ACCESS_KEY": secret["s3_secret"],
               "AWS_DEFAULT_REGION": "us-east-1"}
        yield Stack(folder, pg, prefect_url, mlflow_url, s3, env, starter.servers, starter)
    atexit.unregister(exits.close)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    from contextlib import suppress

    for signum in (signal.SIGINT, signal.SIGTERM):  # (a shell's background job starts with SIGINT ignored)
        signal.signal(signum, _interrupt)
    with server_stack() as stack, suppress(KeyboardInterrupt):
        print("# the servers are up; in another shell:")
        for key, value in stack.env.items():
            print(f"export {key}={value}")
        print(f"# DVC: dvc remote add --local -d team {stack.dvc_remote_url} && "
              f"dvc remote modify --local team endpointurl {stack.s3_endpoint}")
        print(f"# logs: {stack.folder / 'logs'}; Ctrl-C stops everything", flush=True)
        signal.pause()


if __name__ == "__main__":
    main()
