"""Deployments as a user meets them: a real `prefect server start`, `facecap serve`, runs started through the API.

The server and `facecap serve` are separate processes with their own
PREFECT_HOME, as on a real machine. A curate run is created from the
deployment (what the UI's "Run" button does), executed by the serve process,
and read back the way the UI shows it: its state, its artifacts (funnel table,
quality summary), and the train run its completion triggered. A failed curate
run triggers nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from facecap import deploy
from facecap.settings import ConfigError
from facecap.config import Config

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# The recurate schedule is registered; its next run is days away, so nothing fires during the test.
# The example photos are copies of one portrait: dedup.keep=all leaves the triggered training a batch of faces, and
# quality.test_fraction=0 keeps them in train (as one near-duplicate cluster they share one split).
SERVE_SETTINGS = ["ingest.shard_size=8", "execution.n_workers=1", "train.model_size=tiny", "train.steps=1",
                  "train.batch_size=4", "train.num_workers=0", "dedup.keep=all",
                  "quality.test_fraction=0",
                  "deploy.sources=[/nonexistent/sources]", "deploy.out=/nonexistent/out",
                  "deploy.recurate_cron=15 4 * * 2"]
SERVE_SETTINGS_ARGS = [a for setting in SERVE_SETTINGS for a in ("--set", setting)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`facecap serve` with no PREFECT_API_URL: it starts `prefect server start` (API, UI, scheduler,
    event triggers) on a free 127.0.0.1 port with a temporary PREFECT_HOME, registers the deployments
    and executes their runs."""
    home = tmp_path_factory.mktemp("serve-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "facecap", "serve", "--profile", "offline", "--port", str(port), *SERVE_SETTINGS_ARGS],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(home))
    client = httpx.Client(base_url=url, timeout=30)

    def deployments() -> dict | None:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            found = client.post("/deployments/filter", json={}).json()
        except httpx.HTTPError:
            return None  # the server is still starting
        names = {f"{d['name']}": d for d in found}
        return names if {"curate", "recurate", "train", "validate", "eval"} <= set(names) else None

    try:
        yield client, wait_for(deployments, 240, "facecap serve to start a server and register deployments"), \
            log_path, url
    finally:
        proc.send_signal(signal.SIGTERM)  # serve stops the server it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        client.close()


def start_run(client: httpx.Client, deployment: dict, parameters: dict) -> str:
    """Create a flow run from a deployment (what the UI's Run button does); the serve process picks it up."""
    for attempt in range(5):
        created = client.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters})
        # The server's SQLite database answers 503 while another run's workers write to it: ask again,
        # as a person clicking Run would.
        if created.status_code != 503:
            break
        time.sleep(1 + attempt)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def wait_final(client: httpx.Client, run_id: str, timeout: float, log: Path) -> dict:
    def final():
        run = client.get(f"/flow_runs/{run_id}").json()
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    try:
        return wait_for(final, timeout, f"flow run {run_id}")
    except AssertionError:
        raise AssertionError(log.read_text()[-4000:])


def train_runs(client: httpx.Client, deployment: dict) -> list[dict]:
    return client.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}).json()


@pytest.mark.flow
@pytest.mark.e2e
def test_deployment_run_shows_state_artifacts_and_triggers_training(served, example_dir, tmp_path):
    client, deployments, log, url = served
    ui = httpx.get(url.removesuffix("/api") + "/", timeout=30)  # the UI people open
    assert ui.status_code == 200 and "<html" in ui.text.lower()
    curate, train = deployments["curate"], deployments["train"]
    assert curate["tags"] == ["facecap", "curate"] and curate["parameters"]["profile"] == "offline"

    # Three runs at once: one whose release fails its quality gate (no face in its images: an empty release),
    # one refused before any work (a relative output path), neither of which may trigger training, and one that
    # completes.
    faceless = tmp_path / "faceless"
    faceless.mkdir()
    for name in ("coffee.png", "rocket.jpg"):
        (faceless / name).write_bytes((example_dir / "folder" / name).read_bytes())
    gated_out = tmp_path / "gated"
    gated = start_run(client, curate, {"sources": [str(faceless)], "out": str(gated_out)})
    refused = start_run(client, curate, {"sources": [str(example_dir / "folder")], "out": "relative/out"})
    out = tmp_path / "out"
    good = start_run(client, curate, {"sources": [str(example_dir / "folder"), str(example_dir / "parquet")],
                                      "out": str(out)})
    refused_run = wait_final(client, refused, 300, log)
    assert refused_run["state"]["type"] == "FAILED"
    assert "must be an absolute path" in refused_run["state"]["message"], refused_run["state"]
    gated_run = wait_final(client, gated, 420, log)
    assert gated_run["state"]["type"] == "FAILED" and "min_face_records" in gated_run["state"]["message"], \
        gated_run["state"]
    assert not (gated_out / "release").exists()
    run = wait_final(client, good, 420, log)
    assert run["state"]["type"] == "COMPLETED", (run["state"], log.read_text()[-4000:])
    assert run["name"] == f"curate {out}" and "facecap" in run["tags"]
    release_json = out / "release" / "release.json"
    assert release_json.exists()

    # The inner curate flow runs (subflows) hold the artifacts, as the UI lists them under each run.
    artifacts = client.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["curate-funnel",
                                                                                      "curate-quality"]}}}).json()
    mine = [a for a in artifacts if str(out / "release") in (a["description"] or "") + str(a["data"])]
    by_key = {a["key"]: a for a in mine}
    assert set(by_key) == {"curate-funnel", "curate-quality"}, artifacts
    funnel = {row["stage"]: row for row in _table(by_key["curate-funnel"]["data"])}
    from helpers import read_release

    data, _ = read_release(out)
    assert funnel["dedup (release-wide)"]["records out"] == funnel["detect"]["records out"] == data.num_rows > 0
    assert funnel["ingest"]["already done (skipped)"] == 0
    assert "quality suites passed" in by_key["curate-quality"]["data"]
    assert str(out / "release" / "report" / "index.html") in by_key["curate-quality"]["data"]
    blocked = [a for a in artifacts if a["key"] == "curate-quality" and str(gated_out) in a["data"]]
    assert len(blocked) == 1 and "NOT published" in blocked[0]["data"] and "min_face_records" in blocked[0]["data"]

    # Task runs are named by stage and shard, and carry no tags (each tag costs a concurrency-slot lookup).
    # (the inner curate flow run has the deployment run's name, so this finds its task runs)
    tasks = client.post("/task_runs/filter", json={"flow_runs": {"name": {"any_": [run["name"]]}}}).json()
    stage_tasks = [t for t in tasks if t["name"].split(" ")[0] in ("ingest", "detect")]
    assert stage_tasks and all(t["state"]["type"] == "COMPLETED" and not t["tags"] for t in stage_tasks)
    assert {t["name"].split(" ")[0] for t in stage_tasks} == {"ingest", "detect"}

    # Its completion triggered the train deployment on the new release.
    triggered = wait_for(lambda: train_runs(client, train), 120, "the train run triggered by the curate run")
    assert len(triggered) == 1, "only the completed curate run may trigger training, not the failed ones"
    assert triggered[0]["parameters"]["release_dir"] == str(out / "release")
    assert triggered[0]["parameters"]["out"] == str(out / "train")
    assert triggered[0]["parameters"]["settings"] == SERVE_SETTINGS
    # ...and the serve process ran it: a (tiny, random-init) FLIP model trained one step on that release.
    trained = wait_for(lambda: (r := client.get(f"/flow_runs/{triggered[0]['id']}").json())["state"]["type"]
                       in ("COMPLETED", "FAILED", "CRASHED") and r, 300, "the triggered train run")
    assert trained["state"]["type"] == "COMPLETED", (trained["state"], log.read_text()[-3000:])
    assert (out / "train" / "model").is_dir()


@pytest.mark.flow
@pytest.mark.e2e
def test_served_deployments_carry_schedule_parameters_and_tags(served):
    _, deployments, _, _ = served
    recurate = deployments["recurate"]
    assert [s["schedule"]["cron"] for s in recurate["schedules"]] == ["15 4 * * 2"]
    assert recurate["parameters"]["sources"] == ["/nonexistent/sources"]
    assert recurate["parameters"]["out"] == "/nonexistent/out"
    assert deployments["curate"]["schedules"] == [] and "scheduled" in recurate["tags"]
    schema = deployments["curate"]["parameter_openapi_schema"]
    assert {"sources", "out", "config_file", "settings", "config", "llm_endpoint", "dask_address"} <= \
        set(schema["properties"]) and set(schema["required"]) == {"sources", "out"}


def _table(data):
    import json

    rows = json.loads(data) if isinstance(data, str) else data
    return rows


def test_recurate_schedule_and_prefect_yaml_agree_with_the_code():
    cfg = Config.model_validate({"deploy": {"sources": ["/data/sources"], "out": "/data/facecap",
                                            "recurate_cron": "30 2 * * 1"}})
    specs = {s.name: s for s in deploy.deployment_specs(cfg, "/etc/facecap/config.yaml", [], None)}
    assert specs["recurate"].cron == "30 2 * * 1" and specs["recurate"].parameters["sources"] == ["/data/sources"]
    assert specs["train"].triggers and specs["train"].triggers[0]["expect"] == ["prefect.flow-run.Completed"]
    no_sources = {s.name for s in deploy.deployment_specs(Config(), None, [], None)}
    assert "recurate" not in no_sources and "curate" in no_sources

    # prefect.yaml is what `facecap deploy --write-prefect-yaml` renders from docker/facecap.yaml.
    from facecap.config import load_config

    docker_cfg = load_config(ROOT / "docker" / "facecap.yaml")
    rendered = deploy.prefect_yaml(
        deploy.deployment_specs(docker_cfg, "/etc/facecap/config.yaml", [], None), docker_cfg.deploy.work_pool)
    assert yaml.safe_load((ROOT / "prefect.yaml").read_text()) == yaml.safe_load(rendered), \
        "prefect.yaml is stale: facecap deploy --config docker/facecap.yaml --write-prefect-yaml prefect.yaml"
    for entry in yaml.safe_load(rendered)["deployments"]:
        path, _, function = entry["entrypoint"].partition(":")
        assert (ROOT / path).is_file() and f"def {function}(" in (ROOT / path).read_text(), entry["entrypoint"]


def test_deployment_parameters_resolve_into_the_typed_config():
    cfg = deploy.resolve_config(None, {"detect": {"min_score": 0.9}, "ingest": {"image_extensions": [".png"]}},
                                ["detect.min_face_px=64"], "offline")
    assert (cfg.detect.min_score, cfg.detect.min_face_px, cfg.ingest.image_extensions) == (0.9, 64, [".png"])
    with pytest.raises(ConfigError, match="detect.min_scor"):
        deploy.resolve_config(None, {"detect": {"min_scor": 0.9}}, [], None)
    with pytest.raises(ConfigError, match="mapping"):
        deploy.resolve_config(None, ["detect.min_score=0.9"], [], None)


@pytest.mark.e2e
def test_deploy_without_a_server_is_a_clear_error(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "facecap", "deploy", "--profile", "offline"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 2 and "PREFECT_API_URL" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.flow
@pytest.mark.e2e
def test_facecap_deploy_and_prefect_deploy_register_for_a_work_pool(served, tmp_path):
    """The cluster path: deployments in work pool `facecap` for `prefect worker start --pool facecap`."""
    prefect_server = served[3]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": prefect_server}
    registered = subprocess.run(
        [sys.executable, "-m", "facecap", "deploy", "--config", str(ROOT / "docker" / "facecap.yaml"),
         "--work-pool", "facecap-test"], capture_output=True, text=True, env=env, timeout=300)
    assert registered.returncode == 0, registered.stderr
    client = httpx.Client(base_url=prefect_server, timeout=30)
    pool = client.get("/work_pools/facecap-test")
    assert pool.status_code == 200 and pool.json()["type"] == "process"
    found = {d["name"]: d for d in client.post("/deployments/filter", json={}).json()
             if d.get("work_pool_name") == "facecap-test"}
    assert set(found) == {"curate", "recurate", "validate", "train", "eval", "takedown"}
    assert found["curate"]["entrypoint"] == deploy.CURATE_ENTRYPOINT.replace(":", ".")  # a module path entrypoint
    assert found["curate"]["parameters"]["config_file"] == str(ROOT / "docker" / "facecap.yaml")

    # prefect.yaml is valid for the pinned Prefect: `prefect deploy --all` from the project root accepts it.
    client.post("/work_pools/", json={"name": "facecap", "type": "process"})
    deployed = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    in_pool = {d["name"] for d in client.post("/deployments/filter", json={}).json()
               if d.get("work_pool_name") == "facecap"}
    assert in_pool == {"curate", "recurate", "validate", "train", "eval", "takedown"}
    client.close()
