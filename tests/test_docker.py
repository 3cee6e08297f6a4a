"""docker/: no Docker engine runs here, so the stack is checked statically.

compose.yaml's structure (services, health checks, volumes, GPU reservations),
every file it and the Dockerfiles reference, and every service's command
against the tools it names: `facecap` commands through FaceCap's own parser,
`dask scheduler` / `dask worker` through their click commands, `prefect`
commands through `prefect ... --help` of the installed version. vLLM is not
installed here (it has its own image); its arguments are checked against the
LLM settings FaceCap uses to call it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_compose_has_the_whole_stack_with_health_checks():
    expected = {"postgres", "prefect-server", "dask-scheduler", "dask-worker-cpu", "dask-worker-gpu", "vllm",
                "prefect-worker", "deploy"}
    assert expected <= set(SERVICES)
    for name, service in SERVICES.items():
        if service.get("restart") != "no":  # one-shot jobs exit; everything else must say when it is healthy
            assert service["healthcheck"]["test"][0] == "CMD", name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in SERVICES and condition["condition"] in ("service_healthy", "service_started"), name
    gpu_services = {name for name, s in SERVICES.items()
                    if any("gpu" in d.get("capabilities", []) for d in
                           s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []))}
    assert gpu_services == {"dask-worker-gpu", "vllm"}
    assert "postgresql+asyncpg://" in SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]


def test_volumes_and_bind_mounts_exist():
    declared = set(COMPOSE["volumes"])
    assert {"data", "models", "pgdata"} <= declared
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).resolve().is_file(), (name, mount)
            else:
                assert source in declared, (name, mount)


def test_build_contexts_and_dockerfiles_exist_and_copy_real_files():
    images = {}
    for name, service in SERVICES.items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            path = context / service["build"].get("dockerfile", "Dockerfile")
            assert path.is_file(), (name, path)
            images[service["image"]] = (context, path)
        elif service["image"].startswith("facecap"):
            assert service["image"] in {s.get("image") for s in SERVICES.values() if "build" in s}, name
    assert len(images) == 3
    for context, path in images.values():
        for instruction, args in dockerfile(path):
            if instruction == "COPY" and not args.startswith("--from"):
                sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
                for source in sources:
                    assert (context / source).exists(), (path.name, source)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu", "vllm/Dockerfile"])
def test_dockerfiles_are_pinned_and_run_as_non_root(name):
    steps = dockerfile(DOCKER / name)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in steps if i == "ARG" and "=" in a}
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0]) for i, a in steps if i == "FROM"]
    for base in bases:
        image, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: unpinned base {base}"
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name} runs as root"
    if name != "vllm/Dockerfile":
        assert len(bases) >= 2, f"{name} is not multi-stage"
        runs = " ".join(a for i, a in steps if i == "RUN")
        assert "-r requirements.lock" in runs or "requirements.gpu.lock" in runs, name
        assert "--no-deps ." in runs, f"{name} must install FaceCap without re-resolving dependencies"


def test_gpu_image_swaps_in_gpu_builds_of_pinned_packages():
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    runs = " ".join(a for i, a in dockerfile(DOCKER / "Dockerfile.gpu") if i == "RUN")
    # The sed expressions must match real lines of the lock, or the image would silently keep the CPU builds.
    assert "torch==2.13.0+cpu" in lock and r"s/^torch==2\.13\.0+cpu$/torch==2.13.0/" in runs
    assert any(line.startswith("onnxruntime==") for line in lock) and "s/^onnxruntime==/onnxruntime-gpu==/" in runs


def commands() -> list[tuple[str, list[str]]]:
    return [(name, [str(a) for a in s["command"]]) for name, s in SERVICES.items() if "command" in s]


@pytest.mark.parametrize("name,argv", [c for c in commands() if c[1][0] == "facecap"])
def test_facecap_commands_exist(name, argv):
    from facecap.cli import build_parser

    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown command or option
    assert getattr(args, "handler", None) or args.command in ("curate", "config", "example-data")
    if getattr(args, "config", None):
        assert args.config == "/etc/facecap/config.yaml"


@pytest.mark.parametrize("name,argv", [c for c in commands() if c[1][0] == "dask"])
def test_dask_commands_exist(name, argv):
    from distributed.cli import dask_scheduler, dask_worker

    command = {"scheduler": dask_scheduler.main, "worker": dask_worker.main}[argv[1]]
    context = command.make_context(f"dask {argv[1]}", argv[2:])  # click validates every option and value
    if argv[1] == "worker":
        assert context.params["scheduler"] == "tcp://dask-scheduler:8786"
        assert ("GPU=1" == context.params["resources"]) == (name == "dask-worker-gpu")


@pytest.mark.e2e
@pytest.mark.parametrize("name,argv", [c for c in commands() if c[1][0] == "prefect"])
def test_prefect_commands_exist(name, argv):
    words = [a for a in argv[1:] if not a.startswith("-")]
    subcommand = words[:2]
    help_text = subprocess.run([PREFECT, *subcommand, "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0, help_text.stderr
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in help_text.stdout, f"{name}: prefect {' '.join(subcommand)} has no {flag}"


def test_vllm_serves_the_model_and_port_facecap_calls():
    from facecap.config import load_config

    cfg = load_config(DOCKER / "facecap.yaml")
    argv = [str(a) for a in SERVICES["vllm"]["command"]]
    assert argv[0] == cfg.llm.model == argv[argv.index("--served-model-name") + 1]
    assert cfg.llm.endpoint == f"http://vllm:{argv[argv.index('--port') + 1]}/v1"
    assert cfg.execution.dask_address == SERVICES["dask-worker-cpu"]["command"][2]
    assert cfg.detect.device == "cuda"  # detect runs on the GPU worker only
