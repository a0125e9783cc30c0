"""The labelling page under load: time to save a ranking with N annotators at once, on loopback.

For each concurrency level (default 1, 2 and 8 annotators) the script writes a generation file (P prompts, K
responses each, as `instructflow generate --n K` writes it) into a temp folder, starts the real page on it
(`instructflow label FILE --port 0`, a subprocess: uvicorn, FastAPI, the SQLite store) and runs that many
simulated annotators, one thread each, with its own HTTP connection. An annotator does what the page's script
does, with no pause for thought: GET /api/next, then POST /api/rank with a random order of the K responses, a
bounded number of times (--rankings each). Every request has a 30 s timeout.

It prints, per level: the latency of a save (POST /api/rank: the ranking is written and committed to SQLite before
the answer) and of a fetch (GET /api/next: the store leases the annotator a prompt), as median, p95, p99 and max in
milliseconds; the saves per second over the level's wall time; and the check that nothing was lost or duplicated
(the labels the page exports against the saves that were answered 200, and no prompt ranked twice by one person).

    .venv/bin/python bench/label.py                          # 1, 2 and 8 annotators, 40 rankings each
    .venv/bin/python bench/label.py --annotators 2 8 --rankings 100 --min-rankings 2

It prints figures; it asserts nothing (a lost or duplicated ranking is printed as such and exits 1).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instructflow import env  # noqa: E402

env.setup(ROOT)

from apps.label import announced_url  # noqa: E402


def write_generation(path: Path, prompts: int, k: int) -> None:
    with path.open("w") as fh:
        for p in range(prompts):
            for s in range(k):
                fh.write(json.dumps({"prompt_index": p, "sample": s, "prompt": f"What is {p} + 1?",
                                     "response": f"response {s} to prompt {p}: " + "words " * (5 + 3 * s)}) + "\n")


def start_page(samples: Path, min_rankings: int) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "apps.cli", "label", str(samples), "--port", "0",
                             "--min-rankings", str(min_rankings), "--root", str(ROOT)], cwd=ROOT,
                            env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    said = []
    for line in proc.stdout:
        said.append(line)
        url = announced_url(line)
        if url:
            host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, host, int(port)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the page did not start: exit {proc.wait()}\n{''.join(said)}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def annotator(name: str, host: str, port: int, k: int, rankings: int, seed: int, out: dict) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    saves, fetches, saved, errors = [], [], [], []

    def call(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, payload, {"Content-Type": "application/json"} if payload else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")

    for _ in range(rankings):
        start = time.perf_counter()
        status, served = call("GET", f"/api/next?annotator={name}")
        fetches.append(time.perf_counter() - start)
        if status != 200:
            errors.append(f"next: {status} {served}")
        if status != 200 or served.get("prompt_index") is None:
            break
        order = list(range(k))
        rng.shuffle(order)
        start = time.perf_counter()
        status, answer = call("POST", "/api/rank", {"annotator": name, "prompt_index": served["prompt_index"],
                                                    "ranking": [[i] for i in order]})
        saves.append(time.perf_counter() - start)
        if status == 200:
            saved.append(served["prompt_index"])
        else:
            errors.append(f"rank: {status} {answer}")
    conn.close()
    out[name] = {"saves": saves, "fetches": fetches, "saved": saved, "errors": errors}


def level(n: int, args, folder: Path) -> dict:
    samples = folder / f"samples_{n}.jsonl"
    write_generation(samples, args.prompts, args.k)
    proc, host, port = start_page(samples, args.min_rankings)
    out: dict[str, dict] = {}
    try:
        threads = [threading.Thread(target=annotator, args=(f"a{i}", host, port, args.k, args.rankings, i, out))
                   for i in range(n)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(10)
    exported = folder / f"labels_{n}.jsonl"
    done = subprocess.run([sys.executable, "-m", "apps.cli", "label", str(samples), "--export", str(exported),
                           "--root", str(ROOT)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"export failed: {done.stdout}{done.stderr}")
    labels = [json.loads(line) for line in exported.read_text().splitlines() if line.strip()]
    answered = sorted((name, p) for name, got in out.items() for p in got["saved"])
    kept = sorted((row["annotator"], row["prompt_index"]) for row in labels)
    saves = [s for got in out.values() for s in got["saves"]]
    fetches = [s for got in out.values() for s in got["fetches"]]
    return {"annotators": n, "saves": len(saves), "wall": wall, "save_ms": [1000 * s for s in saves],
            "fetch_ms": [1000 * s for s in fetches], "errors": [e for got in out.values() for e in got["errors"]],
            "lost": len(set(answered) - set(kept)), "extra": len(set(kept) - set(answered)),
            "duplicates": len(kept) - len(set(kept))}


def row(name: str, ms: list[float]) -> str:
    return (f"{name} {statistics.median(ms):7.1f} {percentile(ms, 0.95):7.1f} {percentile(ms, 0.99):7.1f} "
            f"{max(ms):7.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotators", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--rankings", type=int, default=40, help="rankings each annotator saves (bounded)")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--k", type=int, default=4, help="responses per prompt")
    parser.add_argument("--min-rankings", type=int, default=1)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores; {args.prompts} prompts x K={args.k}, "
          f"{args.rankings} rankings per annotator, min_rankings {args.min_rankings}")
    print("annotators  saves  saves/s | save ms: median    p95    p99    max | next ms: median    p95    p99    max"
          " | lost dup errors")
    bad = False
    with tempfile.TemporaryDirectory(prefix="label-bench-") as tmp:
        for n in args.annotators:
            got = level(n, args, Path(tmp))
            bad |= bool(got["lost"] or got["extra"] or got["duplicates"] or got["errors"])
            print(f"{got['annotators']:10d} {got['saves']:6d} {got['saves'] / got['wall']:8.1f} |"
                  f"{row('        ', got['save_ms'])} |{row('        ', got['fetch_ms'])} | "
                  f"{got['lost']:4d} {got['duplicates']:3d} {len(got['errors']):6d}")
            for error in got["errors"][:5]:
                print(f"    {error}")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
