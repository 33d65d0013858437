"""Settings of the plugin daemon, from command-line flags, environment variables and defaults.

A flag wins over its environment variable, which wins over the default.
``SETTINGS`` describes each setting once; ``cli.py`` builds the ``serve``
flags and their help text from it.
"""

import argparse
import os
import shlex
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securevol.engine import socket_path_from_host

DEFAULT_SOCKET = "/run/docker/plugins/securevol.sock"
DEFAULT_STATE_DIR = "/var/lib/securevol"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

# sun_path in struct sockaddr_un is 108 bytes on Linux, including the final NUL.
MAX_SOCKET_PATH_LEN = 107


@dataclass(frozen=True)
class Settings:
    """Resolved daemon settings; paths are absolute."""

    socket: Path
    state_dir: Path
    mount_root: Path
    log_level: str
    workers: int
    key_provider: str
    master_key: Path | None  # None: STATE/master.key, created on first start
    mount_timeout: float
    docker_host: str = DEFAULT_DOCKER_HOST
    default_policy: str = "allow"  # for volumes without an allow option: "allow" or "deny"
    audit_log: Path | None = None  # None: STATE/log/audit.jsonl

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def audit_log_path(self) -> Path:
        return self.audit_log or self.log_dir / "audit.jsonl"

    @property
    def deny_by_default(self) -> bool:
        return self.default_policy == "deny"

    @property
    def allow_set_command(self) -> str:
        """The command that changes a volume's rules, without its arguments, as refusals quote it.

        It names --state-dir unless the state directory is the default, so that the command
        changes this daemon's volume and not one of another daemon on the host.
        """
        if self.state_dir == Path(DEFAULT_STATE_DIR):
            return "securevol allow set"
        return f"securevol allow --state-dir {shlex.quote(str(self.state_dir))} set"


@dataclass(frozen=True)
class SettingSpec:
    """One setting: its flag, environment variable, default and help text."""

    name: str
    flag: str
    env: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    metavar: str | None = None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("must be a whole number") from None
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number


def _default_policy(value: str) -> str:
    if value not in ("allow", "deny"):
        raise ValueError("must be allow or deny")
    return value


def _docker_host(value: str) -> str:
    socket_path_from_host(value)  # raises ValueError for a TCP address or a relative path
    return value


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


SETTINGS = (
    SettingSpec("socket", "--socket", "SECUREVOL_SOCKET", DEFAULT_SOCKET,
                "Unix socket that dockerd connects to, at most 107 bytes; its base name is the driver name",
                metavar="PATH"),
    SettingSpec("state_dir", "--state-dir", "SECUREVOL_STATE_DIR", DEFAULT_STATE_DIR,
                "directory of volume records, wrapped keys and ciphertext (made mode 0700)", metavar="DIR"),
    SettingSpec("mount_root", "--mount-root", "SECUREVOL_MOUNT_ROOT", None,
                "directory under which each volume's plaintext is mounted (default: STATE_DIR/mnt)",
                metavar="DIR"),
    SettingSpec("log_level", "--log-level", "SECUREVOL_LOG_LEVEL", "INFO",
                "log level of the daemon and of each volume's FUSE process: DEBUG, INFO, WARNING or ERROR",
                _log_level, "LEVEL"),
    SettingSpec("workers", "--workers", "SECUREVOL_WORKERS", 4,
                "number of gunicorn worker processes answering dockerd", _positive_int, "N"),
    SettingSpec("key_provider", "--key-provider", "SECUREVOL_KEY_PROVIDER", "local",
                "key provider that wraps each volume's DEK: local (master key file) or transit "
                "(OpenBao/Vault Transit)", metavar="NAME"),
    SettingSpec("master_key", "--master-key", "SECUREVOL_MASTER_KEY", None,
                "path of the local provider's master key file, which must exist "
                "(default: STATE_DIR/master.key, created on first start)", metavar="PATH"),
    SettingSpec("mount_timeout", "--mount-timeout", "SECUREVOL_MOUNT_TIMEOUT", 20.0,
                "seconds to wait for a volume's FUSE process to report that it is mounted",
                _positive_float, "SECONDS"),
    SettingSpec("docker_host", "--docker-host", "SECUREVOL_DOCKER_HOST", DEFAULT_DOCKER_HOST,
                "dockerd's Engine API socket (unix:///PATH), which the allowlist asks who a container is",
                _docker_host, "unix:///PATH"),
    SettingSpec("default_policy", "--default-policy", "SECUREVOL_DEFAULT_POLICY", "allow",
                "who may use a volume created without an allow option: allow (every container) or deny "
                "(no container)", _default_policy, "allow|deny"),
    SettingSpec("audit_log", "--audit-log", "SECUREVOL_AUDIT_LOG", None,
                "file that receives one JSON line per allowlist decision (default: STATE_DIR/log/audit.jsonl)",
                metavar="PATH"),
)


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the flag and the environment variable."""


def add_arguments(
    parser: argparse.ArgumentParser,
    names: Collection[str] | None = None,
    help_texts: Mapping[str, str] | None = None,
    default: Any = None,
) -> None:
    """Add one flag per setting, or per setting in *names*, to *parser*; an unset flag stays *default*.

    *help_texts* replaces the daemon's help text of some settings, for commands
    that use a setting another way. A subcommand's flags get the default
    ``argparse.SUPPRESS`` where its parent command takes the same flags, or
    the subcommand's unset flag would replace the value given to the parent.
    """
    for spec in SETTINGS:
        if names is not None and spec.name not in names:
            continue
        default_text = "" if spec.default is None else f" [default: {spec.default}]"
        help_text = (help_texts or {}).get(spec.name, spec.help)
        parser.add_argument(
            spec.flag,
            dest=spec.name,
            default=default,
            metavar=spec.metavar,
            help=f"{help_text}; environment: {spec.env}{default_text}",
        )


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Settings:
    """Combine flag values (None when unset), *environ* and the defaults into Settings."""
    values: dict[str, Any] = {}
    for spec in SETTINGS:
        raw = flags.get(spec.name)
        source = spec.flag
        if raw is None:
            raw = environ.get(spec.env) or None
            source = spec.env
        if raw is None:
            values[spec.name] = spec.default
            continue
        try:
            values[spec.name] = spec.parse(str(raw))
        except ValueError as exc:
            raise ConfigError(f"Invalid value {raw!r} for {source}: {exc}.") from None

    return _finish(values)


def _finish(values: dict[str, Any]) -> Settings:
    state_dir = Path(values["state_dir"]).absolute()
    mount_root = values["mount_root"]
    master_key = values["master_key"]
    values.update(
        socket=Path(values["socket"]).absolute(),
        state_dir=state_dir,
        mount_root=Path(mount_root).absolute() if mount_root else state_dir / "mnt",
        master_key=Path(master_key).absolute() if master_key else None,
        audit_log=Path(values["audit_log"]).absolute() if values["audit_log"] else None,
    )
    socket_len = len(os.fsencode(values["socket"]))
    if socket_len > MAX_SOCKET_PATH_LEN:
        raise ConfigError(
            f"The socket path {values['socket']} is {socket_len} bytes long; Unix sockets allow at most "
            f"{MAX_SOCKET_PATH_LEN}, so choose a shorter --socket."
        )
    return Settings(**values)
