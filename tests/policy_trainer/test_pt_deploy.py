"""Deployment files: compose.yaml validated by Docker Compose itself when present, plus the
structure we rely on; Dockerfile; accelerate configs parsed by accelerate; docs kept in step."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
ACCEL = sorted((REPO / "policy_trainer" / "configs" / "accelerate").glob("*.yaml"))
KEYS = {"SALMON_API_KEY": "test-api-key", "SALMON_ADMIN_KEY": "test-admin-key"}


def _compose_cmd() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1), whichever can run `version` here."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            ok = subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cmd
    return None


def _run_compose(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; structure is checked below")
    env = {k: v for k, v in os.environ.items() if k not in KEYS} | env_extra
    return subprocess.run([*cmd, "-f", str(COMPOSE), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)


@pytest.mark.parametrize("profiles", [[], ["replicas"], ["judge"], ["replicas", "judge"]])
def test_compose_config_is_valid(profiles):
    flags = [x for p in profiles for x in ("--profile", p)]
    out = _run_compose([*flags, "config"], KEYS)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    expected = {"rm", "trainer", "synth"} | ({"rm-replica", "rm-lb"} if "replicas" in profiles else set()) \
        | ({"judge"} if "judge" in profiles else set())
    assert expected <= set(cfg["services"])  # compose v1 lists inactive profiles' services too
    assert cfg["services"]["rm"]["environment"]["SALMON_API_KEY"] == KEYS["SALMON_API_KEY"]  # from env


def test_compose_refuses_to_start_without_api_keys():
    out = _run_compose(["config"], {})
    assert out.returncode != 0 and "SALMON_API_KEY" in out.stderr


def test_compose_structure():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    rm, trainer, synth = services["rm"], services["trainer"], services["synth"]
    gpu = rm["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "/readyz" in " ".join(rm["healthcheck"]["test"])
    vols = {name: [v.split(":")[0] for v in s["volumes"]] for name, s in services.items() if "volumes" in s}
    assert "registry" in vols["rm"] and "registry" in vols["synth"]
    assert "rollouts" in vols["trainer"] and "rollouts" in vols["synth"]
    assert trainer["depends_on"]["rm"]["condition"] == "service_healthy"
    assert "train" in trainer["command"] and ["synth", "watch"] == synth["command"][:2]
    for name, s in services.items():  # secrets only ever come from the environment
        for key, value in (s.get("environment") or {}).items():
            if "KEY" in key:
                assert str(value).startswith("${"), f"{name}.{key} is not taken from the environment"
    assert services["rm-replica"]["deploy"]["replicas"] >= 2 and services["rm-replica"]["profiles"] == ["replicas"]
    assert "rm-replica:8000" in " ".join(services["rm-lb"]["command"])
    assert services["judge"]["profiles"] == ["judge"]
    # the trainer's config in the mounted directory validates
    from policy_trainer.config import load_run_config

    cfg_name = trainer["command"][trainer["command"].index("--config") + 1].rsplit("/", 1)[1]
    assert load_run_config(REPO / "policy_trainer" / "configs" / cfg_name).output.rollouts_dir == Path("/data/rollouts")


def test_dockerfile_installs_every_package_and_downloads_no_model():
    text = (REPO / "Dockerfile").read_text()
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in (p.rstrip("*") for p in include):
        assert f"COPY {pkg} ./{pkg}" in text
    assert 'ENTRYPOINT ["salmon"]' in text and "USER salmon" in text
    for banned in ("huggingface-cli", "hf download", "snapshot_download", "from_pretrained"):
        assert banned not in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


@pytest.mark.parametrize("path", ACCEL, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert str(cfg.distributed_type).split(".")[-1] in {"DEEPSPEED", "FSDP"}
    assert cfg.num_processes >= cfg.num_machines >= 1 and cfg.mixed_precision == "bf16"


def test_scaling_doc_names_every_shipped_config():
    doc = (REPO / "docs" / "scaling.md").read_text()
    assert ACCEL
    for p in ACCEL:
        assert f"configs/accelerate/{p.name}" in doc
    for word in ("vllm", "replicas", "accelerate launch", "judge"):
        assert word in doc.lower()
