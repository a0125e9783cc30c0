"""`instructflow label FILE`: a local web page where people rank the K responses a model wrote to each prompt
(InstructGPT's labelling step); the rankings feed the next round's reward model (`--export`, or `rank` reading
the store's export).

- `LabelSettings`: min_rankings, allow_ties, host, port, db, token, lease_seconds; params.yaml's `label:` section
  gives the defaults, the command's flags override them. A host other than loopback needs a token.
- `LabelStore`: the rankings in SQLite (WAL, one transaction per write, UNIQUE(annotator, prompt_index) with an
  upsert), stamped with the generation's sha256: a store made from another generation is refused. It serves
  each person the lowest prompt that is incomplete (fewer than min_rankings rankings) and that they have not
  ranked, and holds it from the others for lease_seconds, so people working at once do not rank the same prompt
  by accident; a submit is always kept (one ranking per person and prompt, the latest).
- `create_app(generation, settings, on_complete=None)`: the FastAPI app (the page under apps/label_static/, a JSON
  API under /api); on_complete() is called once, the first time every prompt has min_rankings rankings.
- `progress(db_path)`: (complete prompts, total prompts) of a store, for a flow that waits on people.
- `serve(generation, settings, ...)`: uvicorn on host:port, used by the CLI.

The API: GET /api/config; GET /api/next?annotator=NAME (the prompt to rank, with progress); POST /api/rank
{annotator, prompt_index, ranking, unacceptable}; GET /api/stats. With a token, every request carries it: the
query parameter `token` once (the answer sets a cookie), the cookie, or the header `X-Label-Token`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from instructflow.errors import ConfigError, DataError, InstructflowError
from instructflow.feedback import Generation, Label, check_ranking, kendall_tau, write_labels

STATIC = Path(__file__).with_name("label_static")
TOKEN_ENV = "INSTRUCTFLOW_LABEL_TOKEN"
TOKEN_COOKIE = "instructflow_label_token"
TOKEN_HEADER = "X-Label-Token"
MAX_NAME = 64


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LabelSettings(BaseModel):
    """How `instructflow label` serves (params.yaml `label:` gives the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_rankings: int = Field(1, ge=1, description="rankings by different people before a prompt is complete")
    allow_ties: bool = Field(False, description="responses may share a tier")
    host: str = Field("127.0.0.1", min_length=1, description="address to bind; not loopback: a token is required")
    port: int = Field(8765, ge=0, le=65535, description="port to bind (0: any free port)")
    db: Path | None = Field(None, description="the SQLite store (default: FILE.labels.sqlite next to FILE)")
    token: str | None = Field(None, description="every request must carry it (query once, then a cookie, or header)")
    lease_seconds: int = Field(600, ge=10, description="how long a served prompt is held from the others")

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if len(value) < 8 or any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError("expected at least 8 printable characters without spaces")
        return value

    @model_validator(mode="after")
    def _exposed(self) -> "LabelSettings":
        if not is_loopback(self.host) and self.token is None:
            raise ValueError(f"binding {self.host} makes the page reachable from other machines: give a token "
                             f"(--token or {TOKEN_ENV}) that every request must then carry, or bind 127.0.0.1")
        return self

    @classmethod
    def resolve(cls, config: Any = None, **overrides: Any) -> "LabelSettings":
        """Settings from params.yaml's `label` section (a LabelConfig, or None for the defaults), overridden by
        the non-None `overrides`; the token from INSTRUCTFLOW_LABEL_TOKEN when not given. A bad value is a
        ConfigError naming the setting, the value and what it takes."""
        values = config.model_dump() if config is not None else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("token") is None and os.environ.get(TOKEN_ENV):
            values["token"] = os.environ[TOKEN_ENV]
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(k) for k in err["loc"])
                shown = "<hidden>" if key == "token" else repr(values.get(key, err.get("input")))
                problems.append(f"label.{key} = {shown}: {err['msg']}" if key else f"label: {err['msg']}")
            raise ConfigError("invalid label settings:\n  " + "\n  ".join(problems)) from None

    def db_path(self, generation_path: Path) -> Path:
        return Path(self.db) if self.db is not None else Path(f"{generation_path}.labels.sqlite")


# --------------------------------------------------------------------------------------------------
# The store

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (prompt_index INTEGER PRIMARY KEY, k INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rankings (
    annotator TEXT NOT NULL,
    prompt_index INTEGER NOT NULL REFERENCES prompts(prompt_index),
    ranking TEXT NOT NULL,
    unacceptable TEXT NOT NULL,
    time TEXT NOT NULL,
    UNIQUE (annotator, prompt_index)
);
CREATE INDEX IF NOT EXISTS rankings_by_prompt ON rankings (prompt_index);
CREATE TABLE IF NOT EXISTS leases (annotator TEXT PRIMARY KEY, prompt_index INTEGER NOT NULL, expires REAL NOT NULL);
"""


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None)
    else:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the page hears "saved"
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _complete_count(conn: sqlite3.Connection, min_rankings: int) -> tuple[int, int]:
    total = conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]
    complete = conn.execute("SELECT COUNT(*) FROM (SELECT prompt_index FROM rankings GROUP BY prompt_index "
                            "HAVING COUNT(*) >= ?)", (min_rankings,)).fetchone()[0]
    return complete, total


def progress(db_path: str | Path) -> tuple[int, int]:
    """(prompts with min_rankings rankings, prompts) of a label store, read-only; min_rankings as last served."""
    path = Path(db_path)
    if not path.is_file():
        raise DataError(path, "no label store here; `instructflow label FILE` makes one")
    conn = _connect(path, readonly=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'min_rankings'").fetchone()
        return _complete_count(conn, int(row[0]) if row else 1)
    except sqlite3.DatabaseError as exc:
        raise DataError(path, f"not a label store ({exc})") from None
    finally:
        conn.close()


def _labels(conn: sqlite3.Connection, generation_hash: str) -> list[Label]:
    rows = conn.execute("SELECT annotator, prompt_index, ranking, unacceptable, time FROM rankings "
                        "ORDER BY prompt_index, annotator").fetchall()
    return [Label(generation_hash, p, a, tuple(tuple(t) for t in json.loads(r)), tuple(json.loads(u)), t)
            for a, p, r, u, t in rows]


def export_labels(db_path: str | Path, generation: Generation, out: str | Path) -> list[Label]:
    """Write a store's rankings as the labels file (feedback.write_labels), reading the store only: a store made
    from another generation is refused; a server may be running on it."""
    path = Path(db_path)
    if not path.is_file():
        raise DataError(path, f"no label store here (nobody has ranked {generation.path} yet; --db names another)")
    conn = _connect(path, readonly=True)
    try:
        made_from = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        if made_from is None or made_from[0] != generation.hash:
            raise DataError(path, f"was made from generation {made_from[0] if made_from else '(none)'}, not "
                                  f"{generation.hash} ({generation.path})")
        labels = _labels(conn, generation.hash)
    except sqlite3.DatabaseError as exc:
        raise DataError(path, f"not a label store ({exc})") from None
    finally:
        conn.close()
    write_labels(out, labels)
    return labels


class LabelStore:
    """The rankings of one generation in SQLite; every method opens its own connection (thread-safe)."""

    def __init__(self, path: str | Path, generation: Generation, min_rankings: int = 1, lease_seconds: int = 600):
        self.path, self.generation = Path(path), generation
        self.min_rankings, self.lease_seconds = min_rankings, lease_seconds
        self._writer = threading.Lock()  # this process's writers queue here, not in SQLite's sleeping busy handler
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _connect(self.path)
        except sqlite3.DatabaseError as exc:
            raise DataError(self.path, f"not a label store ({exc}); give another --db") from None
        try:
            conn.executescript(SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            made_from = meta.get("generation")
            if made_from is not None and made_from != generation.hash:
                conn.execute("ROLLBACK")
                raise DataError(self.path, f"was made from generation {made_from} ({meta.get('file', '?')}), not "
                                           f"{generation.hash} ({generation.path}); give another --db for this file")
            if made_from is None:
                conn.execute("INSERT INTO meta VALUES ('generation', ?), ('file', ?), ('created', ?)",
                             (generation.hash, str(generation.path), utc_now()))
                conn.executemany("INSERT INTO prompts VALUES (?, ?)",
                                 [(g.prompt_index, g.k) for g in generation.groups])
            conn.execute("INSERT INTO meta VALUES ('min_rankings', ?) ON CONFLICT(key) DO UPDATE SET value = "
                         "excluded.value", (str(min_rankings),))
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise DataError(self.path, f"not a label store ({exc}); give another --db") from None
        finally:
            conn.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = _connect(self.path)
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, taken as a writer at once (BEGIN IMMEDIATE: concurrent writers queue, none fails).

        The writers of this process take turns on a lock first: SQLite's busy handler makes a waiting writer sleep
        in growing steps (8 people at once: saves up to a second), the lock hands over at once. Another process
        on the same store still waits in SQLite (busy_timeout)."""
        conn = _connect(self.path)
        try:
            with self._writer:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        finally:
            conn.close()

    # ------------------------------------------------------------------------------------ writes
    def submit(self, annotator: str, prompt_index: int, ranking: Any, unacceptable: Any = (),
               allow_ties: bool = False) -> Label:
        """Keep a person's ranking of a prompt (replacing theirs, if any); ValueError names what is wrong."""
        annotator = check_annotator(annotator)
        group = self.generation.by_index.get(prompt_index) if isinstance(prompt_index, int) else None
        if group is None:
            raise ValueError(f"prompt_index {prompt_index!r} is not a prompt of {self.generation.path.name}")
        tiers = check_ranking(ranking, group.k, allow_ties)
        flagged = list(unacceptable or ())
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < group.k for i in flagged) \
                or len(set(flagged)) != len(flagged):
            raise ValueError(f"unacceptable: expected distinct response indices 0..{group.k - 1}, got {flagged}")
        label = Label(self.generation.hash, prompt_index, annotator, tiers, tuple(sorted(flagged)), utc_now())
        with self._write() as conn:
            conn.execute("INSERT INTO rankings VALUES (?, ?, ?, ?, ?) ON CONFLICT(annotator, prompt_index) DO UPDATE "
                         "SET ranking = excluded.ranking, unacceptable = excluded.unacceptable, time = excluded.time",
                         (annotator, prompt_index, json.dumps([list(t) for t in tiers]),
                          json.dumps(list(label.unacceptable)), label.time))
            conn.execute("DELETE FROM leases WHERE annotator = ? AND prompt_index = ?", (annotator, prompt_index))
        return label

    def next_prompt(self, annotator: str) -> tuple[int | None, str]:
        """(the prompt to serve this person, "") or (None, "done" | "held"); a served prompt is leased to them.

        Candidates: prompts they have not ranked whose rankings plus other people's live leases fall short of
        min_rankings; their own leased prompt first (a reload finds the same prompt), then the lowest index.
        "held": what is left for them is leased to others (try again later); "done": nothing is left for them.
        """
        annotator = check_annotator(annotator)
        now = time.time()
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE expires <= ?", (now,))
            row = conn.execute(
                "SELECT p.prompt_index FROM prompts p "
                "WHERE NOT EXISTS (SELECT 1 FROM rankings r WHERE r.prompt_index = p.prompt_index "
                "  AND r.annotator = :a) "
                "AND (SELECT COUNT(*) FROM rankings r WHERE r.prompt_index = p.prompt_index) "
                "  + (SELECT COUNT(*) FROM leases l WHERE l.prompt_index = p.prompt_index AND l.annotator <> :a) < :m "
                "ORDER BY EXISTS (SELECT 1 FROM leases l WHERE l.annotator = :a AND l.prompt_index = p.prompt_index) "
                "DESC, p.prompt_index LIMIT 1", {"a": annotator, "m": self.min_rankings}).fetchone()
            if row is not None:
                conn.execute("INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT(annotator) DO UPDATE SET "
                             "prompt_index = excluded.prompt_index, expires = excluded.expires",
                             (annotator, row[0], now + self.lease_seconds))
                return row[0], ""
            conn.execute("DELETE FROM leases WHERE annotator = ?", (annotator,))
            left = conn.execute(
                "SELECT COUNT(*) FROM prompts p WHERE NOT EXISTS (SELECT 1 FROM rankings r WHERE r.prompt_index = "
                "p.prompt_index AND r.annotator = :a) AND (SELECT COUNT(*) FROM rankings r WHERE r.prompt_index = "
                "p.prompt_index) < :m", {"a": annotator, "m": self.min_rankings}).fetchone()[0]
            return None, "held" if left else "done"

    # ------------------------------------------------------------------------------------ reads
    def labels(self) -> list[Label]:
        """Every ranking, by prompt_index then annotator."""
        with self._read() as conn:
            return _labels(conn, self.generation.hash)

    def progress_of(self, annotator: str | None = None) -> dict:
        with self._read() as conn:
            complete, total = _complete_count(conn, self.min_rankings)
            done = conn.execute("SELECT COUNT(*) FROM rankings WHERE annotator = ?",
                                (annotator,)).fetchone()[0] if annotator else 0
        return {"done": done, "total": total, "complete": complete, "min_rankings": self.min_rankings}

    def is_complete(self) -> bool:
        with self._read() as conn:
            complete, total = _complete_count(conn, self.min_rankings)
        return complete == total

    def stats(self) -> dict:
        """Agreement: Kendall's tau-b per prompt for each pair of people who both ranked it, the mean over those
        pairs (overall and per pair of people); rankings and unacceptable flags per person."""
        by_prompt: dict[int, list[Label]] = {}
        people: dict[str, dict] = {}
        for label in self.labels():
            by_prompt.setdefault(label.prompt_index, []).append(label)
            person = people.setdefault(label.annotator, {"annotator": label.annotator, "rankings": 0,
                                                         "unacceptable": 0})
            person["rankings"] += 1
            person["unacceptable"] += len(label.unacceptable)
        prompts, pairs, taus = [], {}, []
        for index in sorted(by_prompt):
            found = []
            for a, b in combinations(sorted(by_prompt[index], key=lambda lab: lab.annotator), 2):
                tau = kendall_tau(a.ranking, b.ranking)
                found.append({"a": a.annotator, "b": b.annotator, "tau": None if math.isnan(tau) else tau})
                if not math.isnan(tau):
                    taus.append(tau)
                    pairs.setdefault((a.annotator, b.annotator), []).append(tau)
            prompts.append({"prompt_index": index, "rankings": len(by_prompt[index]), "pairs": found})
        progress_now = self.progress_of()
        return {"annotators": sorted(people.values(), key=lambda p: p["annotator"]), "prompts": prompts,
                "pairs": [{"a": a, "b": b, "prompts": len(v), "mean_tau": sum(v) / len(v)}
                          for (a, b), v in sorted(pairs.items())],
                "mean_tau": sum(taus) / len(taus) if taus else None, "compared_pairs": len(taus),
                "complete": progress_now["complete"], "total": progress_now["total"],
                "min_rankings": self.min_rankings}


def check_annotator(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError("annotator: expected your name (a non-empty string)")
    name = name.strip()
    if len(name) > MAX_NAME or any(not c.isprintable() for c in name):
        raise ValueError(f"annotator: expected at most {MAX_NAME} printable characters, got {name[:80]!r}")
    return name


# --------------------------------------------------------------------------------------------------
# The app


class RankBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    annotator: str
    prompt_index: int
    ranking: list[Any]
    unacceptable: list[int] = []


def create_app(generation: Generation, settings: LabelSettings, on_complete: Callable[[], None] | None = None):
    """The page and its API over a LabelStore at settings.db_path(generation.path)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    store = LabelStore(settings.db_path(generation.path), generation, settings.min_rankings, settings.lease_seconds)
    fired = threading.Event()
    fire_lock = threading.Lock()

    def check_complete() -> None:
        if on_complete is None or fired.is_set():
            return
        with fire_lock:
            if not fired.is_set() and store.is_complete():
                fired.set()
                on_complete()

    @asynccontextmanager
    async def lifespan(_app):
        await run_in_threadpool(check_complete)  # a store already complete counts as the first time
        yield

    app = FastAPI(title="instructflow label", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    if settings.token is not None:
        token = settings.token.encode()

        def carried(value: str | None) -> bool:
            return value is not None and hmac.compare_digest(value.encode(), token)

        @app.middleware("http")
        async def require_token(request: Request, call_next):
            if carried(request.query_params.get("token")):
                url = request.url.remove_query_params("token")
                response = (RedirectResponse(str(url), status_code=303) if request.method == "GET"
                            else await call_next(request))
                response.set_cookie(TOKEN_COOKIE, settings.token, httponly=True, samesite="strict")
                return response
            if carried(request.cookies.get(TOKEN_COOKIE)) or carried(request.headers.get(TOKEN_HEADER)):
                return await call_next(request)
            return PlainTextResponse("this page needs its token: open the link `instructflow label` printed "
                                     f"(?token=...), or send the header {TOKEN_HEADER}", status_code=401)

    @app.exception_handler(ValueError)
    async def bad_value(_request, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/stats", include_in_schema=False)
    def stats_page():
        return FileResponse(STATIC / "stats.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/config")
    def config():
        return {"file": generation.path.name, "generation": generation.hash, "prompts": len(generation),
                "allow_ties": settings.allow_ties, "min_rankings": settings.min_rankings}

    def shown(index: int) -> dict:
        group = generation.by_index[index]
        return {"prompt_index": index, "prompt": group.prompt, "responses": list(group.responses)}

    @app.get("/api/next")
    def next_prompt(annotator: str):
        index, reason = store.next_prompt(annotator)
        return {**(shown(index) if index is not None else {"prompt_index": None}), "reason": reason,
                "progress": store.progress_of(check_annotator(annotator))}

    @app.post("/api/rank")
    def rank(body: RankBody):
        label = store.submit(body.annotator, body.prompt_index, body.ranking, body.unacceptable,
                             settings.allow_ties)
        check_complete()
        return {"saved": label.to_row(), "progress": store.progress_of(label.annotator)}

    @app.get("/api/stats")
    def stats():
        return store.stats()

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), so the URL is known before uvicorn starts."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise InstructflowError(f"cannot resolve host {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InstructflowError(f"cannot bind {host}:{port}: {exc.strerror} (another --port?)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


ANNOUNCE = "ranking page:"  # `instructflow label` prints this, then the page's URL, once it listens


def announced_url(line: str) -> str | None:
    """The page's URL if `line` is the announcement `instructflow label` prints once it listens, else None."""
    head, found, rest = line.partition(ANNOUNCE)
    return rest.split()[0] if found and not head.strip() and rest.split() else None


def page_url(host: str, port: int, token: str | None = None) -> str:
    shown = f"[{host}]" if ":" in host else host
    shown = "127.0.0.1" if shown in ("0.0.0.0", "[::]") else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(generation: Generation, settings: LabelSettings, on_complete: Callable[[], None] | None = None,
          announce: Callable[[str], None] = print, stop_when_complete: bool = False) -> None:
    """Serve the page until Ctrl-C (or, with stop_when_complete, until every prompt is complete)."""
    import uvicorn

    sock = _bind(settings.host, settings.port)
    server: uvicorn.Server | None = None

    def completed() -> None:
        if on_complete is not None:
            on_complete()
        if stop_when_complete and server is not None:
            server.should_exit = True

    app = create_app(generation, settings, completed)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    port = sock.getsockname()[1]
    announce(page_url(settings.host, port, settings.token))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
