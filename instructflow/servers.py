"""The shared servers a run is pointed at, checked before anything runs: up, and taking our credentials.

With the embedded default (no MLFLOW_TRACKING_URI server, no PREFECT_API_URL) there is nothing to check. When
the environment names a tracking server (`MLFLOW_TRACKING_URI=http(s)://...`) or a Prefect API
(`PREFECT_API_URL`), one request to each says whether it answers and whether it takes the credentials this
process would send (`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` or `MLFLOW_TRACKING_TOKEN`;
`PREFECT_API_AUTH_STRING` or `PREFECT_API_KEY`). A server that is down, refuses the credentials or answers
something else stops the command with an InstructflowError naming the URL and the variables to set, before DVC
touches anything (flows/guard.py `preflight`), instead of a client library's retries and traceback minutes later.

Plain HTTP, no MLflow or Prefect import: the check costs a few milliseconds on a server that answers. Secrets are
sent, never printed: a message names variables, not their values.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from instructflow.errors import InstructflowError

TIMEOUT_S = 10.0
COMPOSE = "infra/compose.yaml; README, \"Beyond one machine\""


class ServerError(InstructflowError):
    """A server named by the environment is down or refuses this process's credentials."""


def shown(url: str) -> str:
    """The URL without any user:password in it (a URI may carry them: they are never printed)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _get(url: str, headers: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """(HTTP status, body start) of a GET, or (None, why) when nothing answered."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) checked by callers)
            return response.status, response.read(2000).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:  # refused, no route, DNS, timeout
        reason = getattr(exc, "reason", exc)
        return None, str(reason) or type(reason).__name__


def _why(body: str) -> str:
    """The server's own reason, from an MLflow or Prefect JSON error body (or its first line)."""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            return str(data.get("message") or data.get("detail") or data.get("exception_message") or body)[:300]
    except ValueError:
        pass
    return body.strip().splitlines()[0][:300] if body.strip() else "no reason given"


def check_mlflow(uri: str, environ: Mapping[str, str], timeout: float = TIMEOUT_S) -> None:
    """The tracking server at `uri` answers an authenticated search, or ServerError says what to set."""
    base = uri.rstrip("/")
    headers, sent = {}, "no credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD are not set)"
    user, password = environ.get("MLFLOW_TRACKING_USERNAME"), environ.get("MLFLOW_TRACKING_PASSWORD")
    if environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"], sent = f"Bearer {environ['MLFLOW_TRACKING_TOKEN']}", "the MLFLOW_TRACKING_TOKEN"
    elif user or password:
        headers["Authorization"] = _basic(user or "", password or "")
        sent = f"user {user!r} (MLFLOW_TRACKING_USERNAME) and MLFLOW_TRACKING_PASSWORD"
    status, body = _get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers, timeout)
    where = f"the MLflow tracking server at {shown(base)} (MLFLOW_TRACKING_URI)"
    if status is None:
        raise ServerError(
            f"{where} does not answer ({body}). Start it ({COMPOSE}), or set MLFLOW_TRACKING_URI to the server's "
            f"address; unset it to track into the project's own ./mlflow.db")
    if status in (401, 403):
        raise ServerError(
            f"{where} refused the credentials (HTTP {status}: {_why(body)}); this process sent {sent}. Set "
            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on that server")
    if status != 200:
        raise ServerError(f"{where} answered HTTP {status} to an experiment search: {_why(body)}. Is "
                          f"MLFLOW_TRACKING_URI the address of an MLflow server (its --allowed-hosts must "
                          f"include the host:port used here)?")


def check_prefect(api_url: str, environ: Mapping[str, str], timeout: float = TIMEOUT_S) -> None:
    """The Prefect API at `api_url` answers an authenticated request, or ServerError says what to set."""
    base = api_url.rstrip("/")
    headers, sent = {}, "no credentials (PREFECT_API_AUTH_STRING is not set)"
    if environ.get("PREFECT_API_AUTH_STRING"):
        auth = environ["PREFECT_API_AUTH_STRING"]
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        sent = "the PREFECT_API_AUTH_STRING"
    elif environ.get("PREFECT_API_KEY"):
        headers["Authorization"], sent = f"Bearer {environ['PREFECT_API_KEY']}", "the PREFECT_API_KEY"
    where = f"the Prefect API at {shown(base)} (PREFECT_API_URL)"
    status, body = _get(f"{base}/admin/version", headers, timeout)  # behind the server's auth (/health is not)
    if status is None:
        raise ServerError(
            f"{where} does not answer ({body}). Start the server ({COMPOSE}), or set PREFECT_API_URL to its API "
            f"(http://host:4200/api); unset it to run on a temporary server of the project's own")
    if status in (401, 403):
        raise ServerError(
            f"{where} refused the credentials (HTTP {status}: {_why(body)}); this process sent {sent}. Set "
            f"PREFECT_API_AUTH_STRING to the user:password the server has in PREFECT_SERVER_API_AUTH_STRING")
    cloud = base.startswith(environ.get("PREFECT_CLOUD_API_URL", "https://api.prefect.cloud/api"))
    if status != 200 and not cloud:  # (Prefect's client checks /admin/version on a server, not on Prefect Cloud)
        raise ServerError(f"{where} answered HTTP {status}: {_why(body)}. Does PREFECT_API_URL end in /api?")


def check_services(environ: Mapping[str, str] | None = None, timeout: float = TIMEOUT_S) -> None:
    """Check every server the environment names (none with the embedded default); raise on the first problem."""
    environ = os.environ if environ is None else environ
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    if urlsplit(uri).scheme in ("http", "https"):
        check_mlflow(uri, environ, timeout)
    api = environ.get("PREFECT_API_URL", "")
    if api:
        if urlsplit(api).scheme not in ("http", "https"):
            raise ServerError(f"PREFECT_API_URL is {api!r}: expected the server's API address, "
                              f"http(s)://host:4200/api (unset it to run on a temporary server of the project's own)")
        check_prefect(api, environ, timeout)
