"""`instructflow label`: the settings and the token rule, the SQLite store (assignment, concurrent writers, the
generation check), the API, export -> read_labels, and the page end to end in headless Chromium (Selenium):
a ranking by mouse and one by keyboard, a reload and a SIGKILL of the server mid-way, two people at once."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from apps.label import LabelSettings, LabelStore, announced_url, create_app, progress
from instructflow.config import LabelConfig, load_params
from instructflow.errors import ConfigError, DataError
from instructflow.feedback import Label, read_generation, read_labels

SYSTEM_PACKAGES = ("run `sh infra/system-packages.sh` (or `make test`, which runs it) to install Chromium and "
                   "chromedriver")


def write_generation(path: Path, n_prompts: int = 3, k: int = 3) -> Path:
    rows = [{"prompt_index": p, "prompt": f"Prompt number {p}" if p % 2 == 0 else
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Prompt number {p}"}],
             "sample": s, "response": f"Response {s + 1} to prompt {p}", "finish_reason": "eos", "new_tokens": 5,
             "seed": 100 * p + s, "model_version": "artifacts/sft@0123456789ab", "sampling": {"n": k}}
            for p in range(n_prompts) for s in range(k)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def gen(tmp_path):
    return read_generation(write_generation(tmp_path / "gen.jsonl"))


def stored(db: Path) -> dict[tuple[str, int], tuple[list, list]]:
    """(annotator, prompt_index) -> (ranking, unacceptable), straight from SQLite."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT annotator, prompt_index, ranking, unacceptable FROM rankings").fetchall()
    return {(a, p): (json.loads(r), json.loads(u)) for a, p, r, u in rows}


# ------------------------------------------------------------------------------------------ settings


def test_settings_defaults_overrides_and_the_token_rule(monkeypatch):
    monkeypatch.delenv("INSTRUCTFLOW_LABEL_TOKEN", raising=False)
    params = load_params(ROOT / "params.yaml")
    assert params.label == LabelConfig()  # params.yaml states the defaults
    s = LabelSettings.resolve(params.label, min_rankings=2, allow_ties=True, port=None)
    assert (s.min_rankings, s.allow_ties, s.host, s.port, s.token) == (2, True, "127.0.0.1", 8765, None)
    for host in ("0.0.0.0", "192.168.1.7", "example.org", "::"):
        with pytest.raises(ConfigError) as err:
            LabelSettings.resolve(params.label, host=host)
        assert f"binding {host} makes the page reachable from other machines: give a token (--token or " \
               "INSTRUCTFLOW_LABEL_TOKEN)" in str(err.value)
    for host in ("localhost", "127.0.0.2", "::1"):
        assert LabelSettings.resolve(None, host=host).token is None
    assert LabelSettings.resolve(None, host="0.0.0.0", token="s3cret-token").token == "s3cret-token"
    monkeypatch.setenv("INSTRUCTFLOW_LABEL_TOKEN", "from-the-env")
    assert LabelSettings.resolve(None, host="0.0.0.0").token == "from-the-env"
    with pytest.raises(ConfigError, match=r"label.token = <hidden>: Value error, expected at least 8 printable"):
        LabelSettings.resolve(None, token="short")
    with pytest.raises(ConfigError, match=r"label.min_rankings = 0: Input should be greater than or equal to 1"):
        LabelSettings.resolve(None, min_rankings=0)
    with pytest.raises(ConfigError, match=r"label.port = 70000: Input should be less than or equal to 65535"):
        LabelSettings.resolve(None, port=70000)
    with pytest.raises(ConfigError, match="label.min_rankings = 0"):  # params.yaml's section is checked too
        load_params(ROOT / "params.yaml", ["label.min_rankings=0"])


# ------------------------------------------------------------------------------------------ the store


def test_assignment_with_min_rankings_2_and_three_people(gen, tmp_path):
    store = LabelStore(tmp_path / "s.sqlite", gen, min_rankings=2, lease_seconds=600)
    assert store.next_prompt("ana") == (0, "")
    assert store.next_prompt("bo") == (0, "")  # prompt 0 needs two people: one lease held, still open
    assert store.next_prompt("cy") == (1, "")  # 0 is held by two: cy gets the next
    assert store.next_prompt("ana") == (0, "")  # a reload serves the same prompt
    store.submit("ana", 0, [2, 0, 1])
    assert store.next_prompt("ana") == (1, "")  # 1: cy's lease + ana's = 2
    assert store.next_prompt("bo") == (0, "")
    store.submit("bo", 0, [0, 2, 1])
    assert progress(store.path) == (1, 3)
    assert store.next_prompt("bo") == (2, "")  # 1 is held by ana and cy
    store.submit("cy", 1, [1, 0, 2])
    store.submit("ana", 1, [1, 2, 0])
    store.submit("bo", 2, [0, 1, 2])
    assert store.next_prompt("bo") == (None, "done")  # 0 and 2 ranked by bo, 1 complete
    assert store.next_prompt("cy") == (2, "")
    assert store.next_prompt("ana") == (None, "held")  # 2: bo ranked it, cy holds it
    store.submit("cy", 2, [2, 1, 0])
    assert store.next_prompt("ana") == (None, "done")
    assert progress(store.path) == (3, 3) and store.is_complete()
    assert [(x.prompt_index, x.annotator) for x in store.labels()] == [
        (0, "ana"), (0, "bo"), (1, "ana"), (1, "cy"), (2, "bo"), (2, "cy")]


def test_leases_expire(gen, tmp_path, monkeypatch):
    store = LabelStore(tmp_path / "s.sqlite", gen, min_rankings=1, lease_seconds=10)
    assert store.next_prompt("ana") == (0, "")
    assert store.next_prompt("bo") == (1, "")
    clock = time.time() + 11
    monkeypatch.setattr("apps.label.time.time", lambda: clock)
    assert store.next_prompt("cy") == (0, "")  # ana walked away: her prompt is served again


def test_concurrent_submits_lose_nothing_and_duplicate_nothing(tmp_path):
    gen = read_generation(write_generation(tmp_path / "gen.jsonl", n_prompts=12, k=4))
    store = LabelStore(tmp_path / "s.sqlite", gen, min_rankings=1)
    people = [f"person{i}" for i in range(6)]
    start, errors = threading.Barrier(len(people) * 2), []

    def work(name: str, flip: bool) -> None:
        try:
            start.wait()
            for p in range(12):  # everyone ranks every prompt at the same moments; each twice (the last wins)
                store.submit(name, p, [3, 2, 1, 0] if flip else [0, 1, 2, 3], [1] if flip else [])
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name, flip)) for name in people for flip in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = stored(store.path)
    assert sorted(rows) == sorted((name, p) for name in people for p in range(12))  # none lost, none twice
    assert all(r in (([[0], [1], [2], [3]], []), ([[3], [2], [1], [0]], [1])) for r in rows.values())


def test_concurrent_people_are_served_different_prompts(tmp_path):
    gen = read_generation(write_generation(tmp_path / "gen.jsonl", n_prompts=8, k=2))
    store = LabelStore(tmp_path / "s.sqlite", gen, min_rankings=1)
    start, served = threading.Barrier(8), {}

    def ask(name):
        start.wait()
        served[name] = store.next_prompt(name)[0]

    threads = [threading.Thread(target=ask, args=(f"p{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(served.values()) == list(range(8))


def test_a_store_from_another_generation_is_refused(gen, tmp_path):
    db = tmp_path / "s.sqlite"
    LabelStore(db, gen).submit("ana", 0, [0, 1, 2])
    other = write_generation(tmp_path / "other.jsonl", n_prompts=4)
    with pytest.raises(DataError) as err:
        LabelStore(db, read_generation(other))
    assert f"was made from generation {gen.hash} ({gen.path}), not " in str(err.value)
    assert "give another --db" in str(err.value)
    assert LabelStore(db, gen).labels()[0].annotator == "ana"  # the same generation reopens it
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(DataError, match="not a label store"):
        LabelStore(tmp_path / "junk.sqlite", gen)
    with pytest.raises(DataError, match="no label store here"):
        progress(tmp_path / "none.sqlite")


def test_bad_submits_are_refused(gen, tmp_path):
    store = LabelStore(tmp_path / "s.sqlite", gen)
    with pytest.raises(ValueError, match="ties are not allowed"):
        store.submit("ana", 0, [[0, 1], [2]], allow_ties=False)
    assert store.submit("ana", 0, [[0, 1], [2]], allow_ties=True).ranking == ((0, 1), (2,))
    with pytest.raises(ValueError, match="prompt_index 9 is not a prompt"):
        store.submit("ana", 9, [0, 1, 2])
    with pytest.raises(ValueError, match="annotator: expected your name"):
        store.submit("  ", 1, [0, 1, 2])
    with pytest.raises(ValueError, match="unacceptable: expected distinct response indices 0..2"):
        store.submit("ana", 1, [0, 1, 2], [3])


# ------------------------------------------------------------------------------------------ the API


def test_api_stats_and_on_complete(gen, tmp_path):
    from fastapi.testclient import TestClient

    calls = []
    settings = LabelSettings(min_rankings=2, allow_ties=True, db=tmp_path / "s.sqlite")
    with TestClient(create_app(gen, settings, on_complete=lambda: calls.append(1))) as client:
        assert client.get("/api/config").json()["allow_ties"] is True
        first = client.get("/api/next", params={"annotator": "ana"}).json()
        assert first["prompt_index"] == 0 and first["responses"][2] == "Response 3 to prompt 0"
        assert client.post("/api/rank", json={"annotator": "ana", "prompt_index": 0, "ranking": [[2], [0, 1]]}
                           ).status_code == 200
        bad = client.post("/api/rank", json={"annotator": "ana", "prompt_index": 0, "ranking": [[2], [0]]})
        assert bad.status_code == 422 and "response 1 is not ranked" in bad.json()["detail"]
        for who, p, ranking in [("bo", 0, [2, 1, 0]), ("ana", 1, [0, 1, 2]), ("bo", 1, [0, 1, 2]),
                                ("ana", 2, [1, 0, 2]), ("bo", 2, [0, 1, 2])]:
            answer = client.post("/api/rank", json={"annotator": who, "prompt_index": p, "ranking": ranking})
            assert answer.status_code == 200, answer.text
        assert calls == [1]
        client.post("/api/rank", json={"annotator": "cy", "prompt_index": 2, "ranking": [0, 1, 2]})
        assert calls == [1]  # once
        stats = client.get("/api/stats").json()
    # prompt 0: ana 2 > {0, 1}, bo 2 > 1 > 0: pairs (0,1) tied for ana, (0,2) c, (1,2) c: 2 / sqrt(2 * 3)
    # prompt 1: the same order: 1; prompt 2: ana 1 > 0 > 2, bo 0 > 1 > 2: (1 - ... ) = (2 - 1) / 3
    taus = {p["prompt_index"]: {(x["a"], x["b"]): x["tau"] for x in p["pairs"]} for p in stats["prompts"]}
    assert taus[0][("ana", "bo")] == pytest.approx(2 / 6 ** 0.5)
    assert taus[1][("ana", "bo")] == 1.0 and taus[2][("ana", "bo")] == pytest.approx(1 / 3)
    assert taus[2][("ana", "cy")] == pytest.approx(1 / 3) and taus[2][("bo", "cy")] == 1.0
    assert stats["pairs"][0] == {"a": "ana", "b": "bo", "prompts": 3,
                                 "mean_tau": pytest.approx((2 / 6 ** 0.5 + 1 + 1 / 3) / 3)}
    assert stats["mean_tau"] == pytest.approx((2 / 6 ** 0.5 + 1 + 1 / 3 + 1 / 3 + 1) / 5)
    assert [(p["annotator"], p["rankings"]) for p in stats["annotators"]] == [("ana", 3), ("bo", 3), ("cy", 1)]
    assert (stats["complete"], stats["total"]) == (3, 3)
    with TestClient(create_app(gen, settings, on_complete=lambda: calls.append(2))):
        pass
    assert calls == [1, 2]  # a store already complete: the first check, at start


def test_every_request_carries_the_token(gen, tmp_path):
    from fastapi.testclient import TestClient

    settings = LabelSettings(host="0.0.0.0", token="tok-12345678", db=tmp_path / "s.sqlite")
    with TestClient(create_app(gen, settings), follow_redirects=False) as client:
        for path in ("/", "/api/config", "/static/label.js", "/api/stats"):
            refused = client.get(path)
            assert refused.status_code == 401 and "this page needs its token" in refused.text
        assert client.get("/", params={"token": "wrong-token"}).status_code == 401
        assert client.get("/api/config", headers={"X-Label-Token": "tok-12345678"}).status_code == 200
        opened = client.get("/", params={"token": "tok-12345678"})
        assert opened.status_code == 303 and opened.headers["location"] == "http://testserver/"  # token off the URL
        assert "instructflow_label_token=tok-12345678" in opened.headers["set-cookie"]
        assert client.get("/api/config").status_code == 200  # the cookie now
        assert client.post("/api/rank", json={"annotator": "a", "prompt_index": 0, "ranking": [0, 1, 2]}
                           ).status_code == 200


# ------------------------------------------------------------------------------------------ the CLI


def flat(output: str) -> str:
    """The CLI's output without whitespace: rich wraps it at the terminal's width (80 columns under a test)."""
    return "".join(output.split())


def test_cli_refuses_an_exposed_host_and_exports_labels(gen, tmp_path, monkeypatch):
    from apps.cli import app

    monkeypatch.delenv("INSTRUCTFLOW_LABEL_TOKEN", raising=False)
    runner = CliRunner()
    refused = runner.invoke(app, ["label", str(gen.path), "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "giveatoken(--tokenorINSTRUCTFLOW_LABEL_TOKEN)" in flat(refused.output)
    assert "Traceback" not in refused.output
    out = tmp_path / "labels.jsonl"
    nothing = runner.invoke(app, ["label", str(gen.path), "--export", str(out)])
    assert nothing.exit_code == 2 and "nolabelstorehere" in flat(nothing.output)
    store = LabelStore(Path(f"{gen.path}.labels.sqlite"), gen, min_rankings=2)  # the default store, by the file
    store.submit("ana", 1, [2, 0, 1], [0])
    store.submit("bo", 1, [0, 2, 1])
    done = runner.invoke(app, ["label", str(gen.path), "--export", str(out)])
    assert done.exit_code == 0, done.output
    assert "wrote 2 rankings of 1 of 3 prompts" in done.output
    with sqlite3.connect(store.path) as conn:  # export only reads: a server's settings in the store stay
        assert conn.execute("SELECT value FROM meta WHERE key = 'min_rankings'").fetchone() == ("2",)
    other = write_generation(tmp_path / "other.jsonl", n_prompts=2)
    refused = runner.invoke(app, ["label", str(other), "--db", str(store.path), "--export", str(out)])
    assert refused.exit_code == 2 and f"wasmadefromgeneration{gen.hash},not" in flat(refused.output)
    back = read_labels(out, gen)
    assert list(back) == [1]
    assert [(x.annotator, x.ranking, x.unacceptable) for x in back[1]] == [
        ("ana", ((2,), (0,), (1,)), (0,)), ("bo", ((0,), (2,), (1,)), ())]
    assert all(isinstance(x, Label) and x.generation == gen.hash and x.time.endswith("+00:00") for x in back[1])
    bad = runner.invoke(app, ["label", str(gen.path), "--min-rankings", "0"])
    assert bad.exit_code == 2 and "label.min_rankings=0" in flat(bad.output)


# ------------------------------------------------------------------------------------------ the page, in Chromium

CHROMIUM = ("chromium", "chromium-browser")


class Server:
    """`instructflow label` in its own process; the URL it prints."""

    def __init__(self, file: Path, db: Path, *args: str, port: int = 0):
        self.file, self.db, self.args, self.port = file, db, args, port
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "Server":
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "apps.cli", "label", str(self.file), "--db", str(self.db),
                                      "--port", str(self.port), *self.args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline, seen = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            if announced_url(line):
                self.url = announced_url(line)
                self.port = int(self.url.rsplit(":", 1)[1].strip("/"))
                return self
        self.stop()
        raise AssertionError("instructflow label did not start:\n" + "".join(seen))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def browsers():
    """A factory of headless Chromium sessions (each its own profile: its own name in localStorage)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `make venv` installs requirements.lock")
    binary = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.fail(f"no {'Chromium' if binary is None else 'chromedriver'} on PATH: {SYSTEM_PACKAGES}")
    made = []

    def make():
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        driver.implicitly_wait(0)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.quit()


def wait(driver, condition, timeout=20, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: condition(d), message=f"waiting for {what}; page state {page_state(driver)}")


def page_state(driver) -> dict:
    return driver.execute_script(
        "const p = document.getElementById('prompt'); const r = document.getElementById('ranked');"
        "const g = document.getElementById('progress');"
        "return {state: document.body.dataset.state, prompt: p ? p.dataset.promptIndex : null,"
        " tiers: r ? r.dataset.tiers : null, done: g ? g.dataset.done : null, complete: g ? g.dataset.complete : null,"
        " error: document.getElementById('error').textContent};")


def ranking(driver, prompt_index=None, timeout=20) -> dict:
    """Wait until the page shows a prompt to rank (this one, if given)."""
    def ready(d):
        s = page_state(d)
        return s if s["state"] == "ranking" and (prompt_index is None or s["prompt"] == str(prompt_index)) else False
    return wait(driver, ready, timeout, f"prompt {prompt_index}")


def open_as(driver, url: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait(driver, lambda d: page_state(d)["state"] == "name", what="the name form")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "start").click()


def keys(driver, text: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(text).perform()


def drag(driver, index: int, onto, dy: float = 0.0) -> None:
    """Press the mouse on response `index`'s card, move it over `onto` (dy: from its centre, in its heights),
    release."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    card = driver.find_element(By.ID, f"card-{index}")
    height = onto.size["height"]
    (ActionChains(driver).click_and_hold(card).move_by_offset(0, 8)
     .move_to_element_with_offset(onto, 0, int(dy * height)).release().perform())


def test_page_mouse_keyboard_reload_and_kill(browsers, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    file, db = write_generation(tmp_path / "gen.jsonl", n_prompts=3, k=3), tmp_path / "labels.sqlite"
    server = Server(file, db, "--ties").start()
    driver = browsers()
    try:
        open_as(driver, server.url, "ana")
        ranking(driver, 0)
        # prompt 0 by mouse: 1 into the empty ranking, 0 below it, 2 above 0, then 1 dragged to the bottom
        ranked = driver.find_element(By.ID, "ranked")
        drag(driver, 1, ranked)
        wait(driver, lambda d: page_state(d)["tiers"] == "[[1]]", what="response 2 ranked")
        drag(driver, 0, driver.find_element(By.ID, "card-1"), dy=0.4)
        wait(driver, lambda d: page_state(d)["tiers"] == "[[1],[0]]", what="response 1 below 2")
        drag(driver, 2, driver.find_element(By.ID, "card-0"), dy=-0.4)
        wait(driver, lambda d: page_state(d)["tiers"] == "[[1],[2],[0]]", what="response 3 above 1")
        drag(driver, 1, driver.find_element(By.ID, "card-0"), dy=0.4)
        wait(driver, lambda d: page_state(d)["tiers"] == "[[2],[0],[1]]", what="response 2 to the bottom")
        driver.find_element(By.CSS_SELECTOR, "#card-1 input.bad").click()  # flag response 2 unacceptable
        driver.find_element(By.ID, "submit").click()
        ranking(driver, 1)
        assert stored(db) == {("ana", 0): ([[2], [0], [1]], [1])}
        # prompt 1 by keyboard: 2, 3, 1 in order; then 1 up a place and tied with 2; 3 flagged; Enter
        keys(driver, "231")
        wait(driver, lambda d: page_state(d)["tiers"] == "[[1],[2],[0]]", what="keys 2 3 1")
        keys(driver, Keys.ARROW_UP)
        wait(driver, lambda d: page_state(d)["tiers"] == "[[1],[0],[2]]", what="1 moved up")
        keys(driver, "=")
        wait(driver, lambda d: page_state(d)["tiers"] == "[[0,1],[2]]", what="1 tied with 2")
        keys(driver, "3u" + Keys.ENTER)
        ranking(driver, 2)
        assert stored(db)[("ana", 1)] == ([[0, 1], [2]], [2])
        assert page_state(driver)["done"] == "2"
        # prompt 2 half done, then a reload: the submitted work and the arrangement in progress are both there
        keys(driver, "3")
        wait(driver, lambda d: page_state(d)["tiers"] == "[[2]]", what="key 3")
        driver.refresh()
        state = ranking(driver, 2)
        assert (state["tiers"], state["done"], state["complete"]) == ("[[2]]", "2", "2")
        # the server killed outright (SIGKILL) mid-way, restarted on the same port: nothing lost
        server.kill()
        server = Server(file, db, "--ties", port=server.port).start()
        driver.refresh()
        state = ranking(driver, 2)
        assert (state["tiers"], state["done"]) == ("[[2]]", "2")
        keys(driver, "12" + Keys.ENTER)
        wait(driver, lambda d: page_state(d)["state"] == "done", what="all done")
        assert stored(db) == {("ana", 0): ([[2], [0], [1]], [1]), ("ana", 1): ([[0, 1], [2]], [2]),
                              ("ana", 2): ([[2], [0], [1]], [])}
        assert progress(db) == (3, 3)
        driver.get(server.url + "stats")
        wait(driver, lambda d: d.execute_script("return document.body.dataset.state") == "ready", what="stats")
        assert driver.find_element(By.CSS_SELECTOR, "#people tbody").text == "ana 3 2"
    finally:
        server.stop()


def test_two_people_at_once(browsers, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    n = 6
    file, db = write_generation(tmp_path / "gen.jsonl", n_prompts=n, k=3), tmp_path / "labels.sqlite"
    server = Server(file, db, "--min-rankings", "1").start()
    first, second = browsers(), browsers()
    try:
        open_as(first, server.url, "ana")
        open_as(second, server.url, "bo")
        a, b = ranking(first), ranking(second)
        assert a["prompt"] != b["prompt"]  # each holds a different prompt
        finished = set()
        for _ in range(4 * n):
            for driver in (first, second):
                state = page_state(driver)
                if state["state"] == "ranking":
                    keys(driver, "321" + Keys.ENTER)
                    wait(driver, lambda d, p=state["prompt"]: page_state(d)["state"] in ("done", "held")
                         or (page_state(d)["state"] == "ranking" and page_state(d)["prompt"] != p),
                         what="the next prompt")
                elif state["state"] == "held":
                    driver.find_element(By.ID, "again").click()
                    wait(driver, lambda d: page_state(d)["state"] in ("done", "held", "ranking"), what="again")
                elif state["state"] == "done":
                    finished.add(driver)
            if len(finished) == 2:
                break
        assert len(finished) == 2
        rows = stored(db)
        assert sorted(p for _, p in rows) == list(range(n))  # every prompt ranked exactly once
        assert {name for name, _ in rows} == {"ana", "bo"}  # both did some
        assert all(r == ([[2], [1], [0]], []) for r in rows.values())
        out = tmp_path / "labels.jsonl"
        exported = subprocess.run([sys.executable, "-m", "apps.cli", "label", str(file), "--db", str(db), "--export",
                                   str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                  capture_output=True, text=True)
        assert exported.returncode == 0, exported.stdout + exported.stderr
        back = read_labels(out, read_generation(file))
        assert sorted(back) == list(range(n)) and all(len(v) == 1 for v in back.values())
        assert {(v[0].annotator, p) for p, v in back.items()} == set(rows)
    finally:
        server.stop()
