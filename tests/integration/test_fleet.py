"""`kiln serve models:/NAME`: every alias of a registered model from one tritonserver, following a
remote `mlflow server` — promotion and rollback under load, a tampered version refused, a canary
split, the registry going away and coming back. Real tritonserver, the tiny recipe's packages,
three registered versions; clients speak the OpenAI API only (httpx), Triton's repository API for
what is loaded. The tests run in file order on one server: each says which aliases it leaves."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_RECIPE, run_kiln
from tests.integration.test_triton import MODEL, serving_environment, start_kiln_serve
from tests.stores import free_port, terminate, wait_until_ok

pytestmark = pytest.mark.integration
INTERVAL = 0.5  # --watch-interval
STANDBY = 3.0  # --standby


class Store:
    """A real `mlflow server` on a fixed port over a sqlite store, which a test may stop and start again."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> None:
        log = self.root / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with log.open("a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                                          "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
                                          str(self.port), "--workers", "1"], env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_until_ok(f"{self.url}/health", self.proc, log, "mlflow server")

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("fleet_store"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fleet(store, tiny_run, tmp_path_factory):
    """Versions 1-3 of the tiny model (their packages differ in `max_queue`), v1 @production and v2
    @staging, served by `kiln serve models:/tiny-llama-int4` with an empty routes file."""
    serving_environment()
    env = {"MLFLOW_TRACKING_URI": store.url}
    artifacts = tiny_run["artifacts"]
    for queue in (32, 31, 30):
        run_kiln("run", str(TINY_RECIPE), "--set", f"package.max_queue={queue}", artifacts=artifacts, env=env, check=True)
    for version, alias in (("1", "staging"), ("1", "production"), ("2", "staging")):
        run_kiln("promote", MODEL, version, "--to", alias, artifacts=artifacts, env=env, check=True)
    routes = tmp_path_factory.mktemp("fleet_routes") / "routes.yaml"
    routes.write_text("routes: {}\n")
    proc, info, lines = start_kiln_serve(f"models:/{MODEL}", artifacts, store.url, "--watch-interval", str(INTERVAL),
                                         "--standby", str(STANDBY), "--routes", str(routes))
    output = Output(proc, lines)
    try:
        yield {"proc": proc, "info": info, "output": output, "routes": routes, "env": env, "artifacts": artifacts}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        output.thread.join(10)
    assert proc.returncode == 0, output.text()


class Output:
    """Reads what `kiln serve` prints while it runs (the fleet's log lines), so tests can wait for them."""

    def __init__(self, proc, lines: list[str]):
        self.lines = list(lines)
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            assert time.monotonic() < deadline, f"no line matching {pattern!r} in:\n{self.text()[-3000:]}"
            time.sleep(0.1)


def complete(info, model: str, user: str | None = None, max_tokens: int = 2) -> tuple[int, dict, dict]:
    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, **({"user": user} if user else {})}
    r = httpx.post(f"{info['openai']}/completions", json=body, timeout=60)
    return r.status_code, r.json(), dict(r.headers)


def served_version(info, model: str, **kw) -> str:
    status, body, headers = complete(info, model, **kw)
    assert status == 200, body
    assert headers["x-kiln-version"] == body["model"]
    return body["model"].split("/")[1]


def triton_states(info) -> dict[str, str]:
    req = urllib.request.Request(f"{info['http']}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return {m["name"]: m.get("state", "") for m in json.loads(r.read())}


def metric(info, line_start: str) -> float | None:
    text = httpx.get(info["openai"].removesuffix("/v1") + "/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values) if values else None


def until(condition, timeout: float = 60, what="") -> None:
    """Until `condition()`; `what` (a text, or a function giving one) says what was awaited."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.2)


def test_every_alias_is_answered_with_its_own_version(fleet):
    info = fleet["info"]
    assert info["aliases"] == {"production": "1", "staging": "2"} and info["version"] == "1"
    assert served_version(info, MODEL) == "1" and served_version(info, f"{MODEL}@production") == "1"
    assert served_version(info, f"{MODEL}@staging") == "2" and served_version(info, f"{MODEL}/2") == "2"
    listed = {m["id"]: m["root"] for m in httpx.get(f"{info['openai']}/models").json()["data"]}
    assert listed == {MODEL: f"{MODEL}/1", f"{MODEL}@production": f"{MODEL}/1", f"{MODEL}@staging": f"{MODEL}/2",
                      f"{MODEL}/1": f"{MODEL}/1", f"{MODEL}/2": f"{MODEL}/2"}
    status, body, _ = complete(info, f"{MODEL}/3")  # registered, but no alias points to it
    assert status == 404 and "not served" in body["error"]["message"]
    assert triton_states(info) == {f"{MODEL}-v1": "READY", f"{MODEL}-v2": "READY"}
    # Triton's own answer names the registry version too; its HTTP port follows the aliases as well
    for path, version in ((f"{MODEL}-v2", "2"), (f"{MODEL}@staging", "2"), (MODEL, "1")):
        req = urllib.request.Request(f"{info['http']}/v2/models/{path}/generate", method="POST",
                                     data=json.dumps({"text_input": "Hi", "max_tokens": 1}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["model_version"] == version, path


def test_a_canary_split_is_sticky_and_changes_without_a_restart(fleet):
    info, routes, proc = fleet["info"], fleet["routes"], fleet["proc"]

    def set_split(text: str, expect: str | None) -> None:
        routes.write_text(text)
        proc.send_signal(signal.SIGHUP)
        until(lambda: next(m for m in httpx.get(f"{info['openai']}/models").json()["data"] if m["id"] == MODEL).get("kiln_split") == expect,
              30, f"split {expect}")

    set_split(f"seed: 7\nroutes:\n  {MODEL}: {{production: 90, staging: 10}}\n", "production:90,staging:10")
    versions = Counter()
    lock = threading.Lock()

    def ask(users):
        for user in users:
            v = served_version(info, MODEL, user=user, max_tokens=1)
            with lock:
                versions[v] += 1

    threads = [threading.Thread(target=ask, args=([f"user-{i}" for i in range(k, 1000, 8)],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(versions.values()) == 1000
    assert abs(versions["2"] / 1000 - 0.10) <= 0.03, versions
    assert len({served_version(info, MODEL, user="alice", max_tokens=1) for _ in range(20)}) == 1
    # an alias asked by name bypasses the split
    assert {served_version(info, f"{MODEL}@production", user=f"user-{i}", max_tokens=1) for i in range(20)} == {"1"}
    set_split(f"routes:\n  {MODEL}: {{staging: 1}}\n", "staging:1")
    assert {served_version(info, MODEL, user=f"user-{i}", max_tokens=1) for i in range(20)} == {"2"}
    set_split("routes: {}\n", None)  # leaves bare NAME on @production
    assert served_version(info, MODEL, user="alice", max_tokens=1) == "1"
    assert metric(info, 'kiln_gateway_requests_total{alias="staging",model="tiny-llama-int4",status="200",version="2"}') >= 100


def test_promotion_and_rollback_reach_traffic_under_load_with_no_failed_request(fleet):
    """16 clients stream completions while v2 is promoted to production and then rolled back."""
    info, output = fleet["info"], fleet["output"]
    records, stop = [], threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                started, rec = time.monotonic(), {"versions": set(), "finish": None, "error": None}
                try:
                    with http.stream("POST", f"{info['openai']}/completions",
                                     json={"model": MODEL, "prompt": f"Client {i} says", "max_tokens": 16, "stream": True}) as r:
                        if r.status_code != 200:
                            rec["error"] = f"{r.status_code} {r.read()[:200]!r}"
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                event = json.loads(line[6:])
                                rec["versions"].add(event["model"].split("/")[1])
                                rec["finish"] = event["choices"][0]["finish_reason"] or rec["finish"]
                except httpx.HTTPError as e:
                    rec["error"] = repr(e)
                rec["started"], rec["ended"] = started, time.monotonic()
                records.append(rec)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        run_kiln("promote", MODEL, "2", "--to", "production", artifacts=fleet["artifacts"], env=fleet["env"], check=True)
        promoted = time.monotonic()
        output.wait_for(rf"{MODEL}@production: now version 2", 30)
        # v1 has no alias now: kept as a standby, then unloaded (Triton's index says UNAVAILABLE, then
        # no longer lists it once its snapshot folder is gone)
        until(lambda: triton_states(info).get(f"{MODEL}-v1") in ("UNAVAILABLE", None), STANDBY + 30,
              lambda: f"v1 unloaded: {triton_states(info)}\n{output.text()[-2000:]}")
        rollback_started = time.monotonic()
        run_kiln("rollback", MODEL, artifacts=fleet["artifacts"], env=fleet["env"], check=True)
        rolled = time.monotonic()
        output.wait_for(rf"{MODEL}@production: now version 1 \(was 2\)", 60)
        switched_back = time.monotonic()
        load_seconds = float(re.findall(rf"{MODEL} version 1: .* \(([\d.]+) s\)", output.text())[-1])
        time.sleep(max(0.0, rolled + INTERVAL + load_seconds + 4 - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [r for r in records if r["error"] or r["finish"] not in ("length", "stop")]
    assert not failed, failed[:5]
    assert all(len(r["versions"]) == 1 for r in records)  # one version per answer, named in every chunk
    between = [r for r in records if promoted + INTERVAL + 1 < r["started"] < rollback_started]
    after = [r for r in records if r["started"] > rolled + INTERVAL + load_seconds + 1]
    assert between and after, (len(between), len(after))
    assert {v for r in between for v in r["versions"]} == {"2"}
    assert {v for r in after for v in r["versions"]} == {"1"}
    assert switched_back - rolled < INTERVAL + load_seconds + 5
    assert triton_states(info)[f"{MODEL}-v1"] == "READY"
    assert metric(info, 'kiln_alias_switches_total{alias="production"') == 2


def test_a_tampered_version_is_refused_and_its_alias_stays(fleet, store):
    """Version 3's package is changed in the store after registration: the server refuses it."""
    info, output = fleet["info"], fleet["output"]
    configs = [p for p in (store.root / "artifacts").rglob("config.pbtxt") if "triton" in str(p)]
    from mlflow import MlflowClient

    model_id = MlflowClient(store.url, store.url).get_model_version(MODEL, "3").source.removeprefix("models:/")
    [config] = [p for p in configs if model_id in str(p)]  # in the version's LoggedModel
    config.write_text(config.read_text().replace("count: 1", "count: 2"))
    run_kiln("promote", MODEL, "3", "--to", "staging", artifacts=fleet["artifacts"], env=fleet["env"], check=True)
    output.wait_for(rf"{MODEL} version 3 refused \(IntegrityError\)", 60)
    assert "@staging stays on the version it had" in output.text()
    assert served_version(info, f"{MODEL}@staging") == "2"
    assert metric(info, 'kiln_version_loads_total{model="tiny-llama-int4",result="refused",version="3"}') >= 1
    assert f"{MODEL}-v3" not in {m for m, s in triton_states(info).items() if s == "READY"}


def test_serving_goes_on_while_the_registry_is_away_and_catches_up(fleet, store):
    from mlflow import MlflowClient

    info, output = fleet["info"], fleet["output"]
    store.stop()
    try:
        output.wait_for("cannot be read", 30)
        until(lambda: metric(info, "kiln_registry_reachable") == 0, 30, "reachable gauge 0")
        assert served_version(info, MODEL) == "1"  # the last known aliases
        # a promotion made elsewhere while this server cannot see the store (straight into its database)
        sqlite = f"sqlite:///{store.root / 'mlflow.db'}"
        MlflowClient(sqlite, sqlite).set_registered_model_alias(MODEL, "production", "2")
        time.sleep(2 * INTERVAL)
        assert served_version(info, MODEL) == "1"
    finally:
        store.start()
    output.wait_for("the registry answers again", 60)
    until(lambda: served_version(info, MODEL) == "2", 30, "production on v2 after the registry came back")
    assert metric(info, "kiln_registry_reachable") == 1
    assert metric(info, "kiln_registry_poll_failures_total") >= 1
