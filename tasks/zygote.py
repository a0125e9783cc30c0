"""A warm start for stage processes: one process imports torch, transformers and MLflow once, and forks each stage.

Every stage is `python -m tasks.<stage>` (its DVC command), and each paid about 6 s importing torch, transformers
and MLflow before its work began (tiny preset, 2 cores). During a pipeline run the flow starts one zygote
(`serving`): a process that has imported every stage module and waits on a Unix socket. A stage command that
finds `INSTRUCTFLOW_ZYGOTE` in its environment hands itself to the zygote as soon as the `tasks` package is
imported, before any heavy import (`delegate`, called from tasks/__init__.py): it sends the module it was asked to
run, its working folder, its environment and its stdin/stdout/stderr; the zygote forks, the fork takes all of
them and runs the module as `__main__`, and the command waits for it, passes stop signals on to it and exits with
its exit code. DVC sees the same command, output, signals and exit code as without it.

A fork runs what a fresh process would have run, or nothing: the zygote refuses a request, and the command imports
and runs the stage itself, when
- a project file the zygote imported changed since (an edit during the run: the fork would run the old code),
- the request's Python (prefix, `sys.path`, working folder) differs from the zygote's,
- a variable read when the libraries are imported differs (threads, devices, offline switches: `IMPORT_TIME_ENV`),
- or the zygote is gone or does not answer in time.
Where an NVIDIA GPU is visible the zygote is not used (forking a process whose CUDA is initialised is unsafe, and a
GPU stage's start is a small share of its time there); `INSTRUCTFLOW_ZYGOTE=0` turns it off anywhere.

A stage whose command is killed (SIGKILL, which cannot be passed on) is killed too: the zygote's side of the
connection sees it close. The zygote exits when the flow that started it does.
"""

from __future__ import annotations

import array
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "INSTRUCTFLOW_ZYGOTE"
"""the zygote's socket, set for the stage commands of a pipeline run; `0` turns the zygote off"""
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "CUDA_", "NVIDIA_", "TORCH", "PYTORCH_", "NCCL_", "PYTHON",
                   "LD_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "ACCELERATE_")
"""variables libraries read when imported: the zygote serves only requests that agree with it on all of them"""
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
ANSWER_TIMEOUT_S = 180.0  # a zygote still importing answers once it is done (about 7 s on 2 idle cores)
_HEADER = struct.Struct("!I")


COLD = ("prepare",)
"""stages that import no ML library (prepare starts in 0.1 s): they start as they are, never waiting for the zygote"""


def enabled() -> bool:
    """Whether a pipeline run should start a zygote here (Linux, no NVIDIA GPU, not INSTRUCTFLOW_ZYGOTE=0)."""
    if os.environ.get(ENV) == "0" or not hasattr(os, "pidfd_open"):
        return False
    return not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists())


def stage_modules() -> list[str]:
    """The modules the zygote imports and runs: every stage's but the cold ones (with them torch, transformers and
    MLflow)."""
    from instructflow.stages import STAGES

    return [f"tasks.{s.name}" for s in STAGES if s.name not in COLD]


# -- the zygote ----------------------------------------------------------------------------------------------------

def _import_time_env(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(IMPORT_TIME_ENV)}


def _python_identity() -> dict:
    return {"prefix": sys.prefix, "path": list(sys.path), "cwd": os.getcwd()}


def _project_files(root: Path) -> dict[str, list[int]]:
    """The project's imported source files with their modification time and size."""
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and os.path.isabs(path) and Path(path).resolve().is_relative_to(root):
            st = os.stat(path)
            files[path] = [st.st_mtime_ns, st.st_size]
    return files


class Zygote:
    def __init__(self, listener: socket.socket, root: Path, environ: dict[str, str]):
        self.listener = listener
        self.root = root
        self.identity = _python_identity()
        self.env = _import_time_env(environ)  # as it was before the imports (torch sets some KMP_ variables)
        self.files = _project_files(root)
        self.parent = os.getppid()

    def refusal(self, request: dict) -> str | None:
        """Why a request cannot be forked from here (None: it can)."""
        module = request.get("module", "")
        if not module.startswith("tasks.") or module == __name__:
            return f"not a stage module: {module!r}"
        ident = {k: request.get(k) for k in self.identity}
        if ident != self.identity:
            differs = [k for k in self.identity if ident[k] != self.identity[k]]
            return f"another Python setup ({', '.join(differs)} differs from the zygote's)"
        env = _import_time_env(request.get("env", {}))
        if env != self.env:
            differs = sorted({k for k, _ in set(env.items()) ^ set(self.env.items())})
            return f"variables read at import differ from the zygote's: {', '.join(differs)}"
        for path, stat in self.files.items():
            try:
                st = os.stat(path)
            except OSError:
                return f"{path} is gone since the zygote imported it"
            if [st.st_mtime_ns, st.st_size] != stat:
                return f"{Path(path).relative_to(self.root)} changed since the zygote imported it"
        return None

    def serve(self) -> dict | None:
        """Accept requests until the parent exits; in a stage's fork, return its request (the fork runs it)."""
        self.listener.settimeout(0.5)
        while True:
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:  # reap finished handlers
                    pass
            except ChildProcessError:
                pass
            if os.getppid() != self.parent:
                return None  # the flow that started us is gone
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            if os.fork() == 0:  # the handler of this request (the zygote goes on accepting)
                self.listener.close()
                conn.settimeout(None)
                try:
                    request = self.handle(conn)  # returns only in the stage's fork
                except BaseException as exc:  # the command starts the stage itself
                    try:
                        _send(conn, {"refused": f"the zygote failed: {exc!r}"})
                    finally:
                        os._exit(1)
                if request is None:
                    os._exit(0)
                return request
            conn.close()

    def handle(self, conn: socket.socket) -> dict | None:
        """In the handler: read the request, fork the stage, report its pid and its exit code. In the stage's fork
        it returns the request (with its descriptors); in the handler, None."""
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError) as exc:
            _send(conn, {"refused": f"bad request: {exc}"})
            return None
        if (reason := self.refusal(request)) is not None:
            _send(conn, {"refused": reason})
            for fd in fds:
                os.close(fd)
            return None
        pid = os.fork()
        if pid == 0:
            request["fds"] = fds
            request["conn"] = conn
            return request
        for fd in fds:
            os.close(fd)
        _send(conn, {"pid": pid})
        pidfd = os.pidfd_open(pid)
        while True:
            ready, _, _ = select.select([pidfd, conn], [], [])
            if pidfd in ready:
                break
            if not conn.recv(64):  # the command is gone (SIGKILL): so is its stage
                os.kill(pid, signal.SIGKILL)
                break
        _, status = os.waitpid(pid, 0)
        try:
            _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
        except OSError:
            pass
        return None


def _become(request: dict) -> None:
    """In the stage's fork: take the command's descriptors, folder, environment and arguments."""
    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    request["conn"].close()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [request["module"], *request["args"]]


def warm_tracking_store() -> None:
    """Import MLflow's database stores and build their SQLAlchemy mappers, which MLflow imports only when a stage
    opens its run: 1.0 s of every forked stage's start (measured, micro). Class set-up only: no engine, no
    connection (a connection must not cross a fork)."""
    try:
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        from sqlalchemy.orm import configure_mappers
    except ImportError:  # a stage without MLflow's database extras opens its own store, as before
        return
    configure_mappers()


def main(argv: list[str] | None = None) -> None:
    """`python -m tasks.zygote SOCKET ROOT [MODULE ...]`: bind, import the modules, serve; run a stage in a fork."""
    argv = sys.argv[1:] if argv is None else argv
    path, root, modules = argv[0], Path(argv[1]).resolve(), argv[2:]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # before the imports: a stage that starts meanwhile waits for us instead of importing too
    listener.listen(16)
    import importlib

    environ = dict(os.environ)
    for module in modules:
        importlib.import_module(module)
    warm_tracking_store()
    request = Zygote(listener, root, environ).serve()
    if request is None:
        return
    # the stage's fork: what `python -m <module>` does, in this already warm interpreter
    import runpy

    import warnings

    _become(request)
    # (runpy warns that the module is imported already: here on purpose, it is the zygote's warm copy)
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


# -- the flow's side -----------------------------------------------------------------------------------------------

_SERVING: dict[str, tuple[Path, tuple[str, ...]]] = {}  # the sockets of this process's open serving blocks


@contextmanager
def serving(root: Path, modules: list[str] | None = None) -> Iterator[str | None]:
    """A zygote for this block's stage commands (INSTRUCTFLOW_ZYGOTE set); yields its socket, or None when off.

    modules: what it imports and may run (default: the warm stages' modules). Inside a block of this process that
    serves the same project and modules (compare's values, rounds' rounds, each a pipeline run), that block's
    zygote serves this one too: one start, about 6 s of imports, for all of them."""
    if not enabled():
        yield None
        return
    modules = stage_modules() if modules is None else modules
    key = (Path(root).resolve(), tuple(modules))
    if (outer := os.environ.get(ENV)) and _SERVING.get(outer) == key:
        yield outer
        return
    folder = tempfile.mkdtemp(prefix="instructflow-zygote-")  # 0700: only this user can ask it to run anything
    path = os.path.join(folder, "socket")
    Path(folder, "modules").write_text("\n".join(modules) + "\n")  # what a stage command may hand over
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = subprocess.Popen([sys.executable, "-m", "tasks.zygote", path, str(root), *modules], cwd=root,
                            env=env, stdin=subprocess.DEVNULL, start_new_session=True)  # terminal signals: not ours
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    before = os.environ.get(ENV)
    os.environ[ENV] = path
    _SERVING[path] = key
    try:
        yield path
    finally:
        _SERVING.pop(path, None)
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


# -- the stage command's side ----------------------------------------------------------------------------------------

def _requested_module() -> str | None:
    """The module of `python [options] -m MODULE`, while the interpreter is importing its package."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv[1:]:
        at = argv.index("-m", 1)
        if at + 1 < len(argv):
            return argv[at + 1]
    return None


def delegate() -> None:
    """Run this `python -m tasks.<stage>` in the zygote and exit with its code; return where it cannot be done
    (the caller then imports and runs the stage itself)."""
    path = os.environ.get(ENV)
    module = _requested_module()
    if not path or path == "0" or not module or not module.startswith("tasks.") or module == __name__:
        return
    try:
        if module not in Path(path).with_name("modules").read_text().split():
            return  # a cold stage: it starts faster by itself
    except OSError:
        pass  # (the zygote answers for itself)
    target: dict = {"pid": None, "pending": []}

    def forward(signum, _frame):  # a stop during the handover is held, and passed on once the stage has a pid
        if target["pid"] is None:
            target["pending"].append(signum)
            return
        try:
            os.kill(target["pid"], signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(ANSWER_TIMEOUT_S)
        conn.connect(path)
        request = {"module": module, "args": sys.argv[1:], "env": dict(os.environ), **_python_identity()}
        _send(conn, request, fds=[0, 1, 2])
        answer = _read_message(conn)
    except (OSError, ValueError) as exc:
        answer = {"refused": f"the zygote at {path} did not answer ({exc})"}
    if "refused" in answer:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"instructflow: {module} starts in a fresh process: {answer['refused']}", file=sys.stderr, flush=True)
        for signum in target["pending"]:
            signal.raise_signal(signum)
        return
    target["pid"] = answer["pid"]
    for signum in target["pending"]:
        forward(signum, None)
    conn.settimeout(None)
    try:
        answer = _read_message(conn)
    except (OSError, ValueError):
        answer = {"exit": 1}
    code = answer.get("exit", 1)
    os._exit(code if code >= 0 else 128 - code)  # killed by signal N: the shell's 128 + N


# -- the wire: length-prefixed JSON; the descriptors ride on the first message -------------------------------------

def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    header = _HEADER.pack(len(data))
    if fds:
        conn.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        conn.sendall(header)
    conn.sendall(data)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = conn.recv(n)
        if not chunk:
            raise ValueError("the connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_message(conn: socket.socket) -> dict:
    (size,) = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
    return json.loads(_recv_exact(conn, size))


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    header, ancillary, _, _ = conn.recvmsg(_HEADER.size, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(header) < _HEADER.size:
        header += _recv_exact(conn, _HEADER.size - len(header))
    (size,) = _HEADER.unpack(header)
    request = json.loads(_recv_exact(conn, size))
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected stdin, stdout and stderr, got {len(fds)} descriptors")
    return request, list(fds)


if __name__ == "__main__":
    main()
