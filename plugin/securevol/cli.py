"""The ``securevol`` command.

``securevol serve`` runs the plugin daemon: the Flask app of ``api.py`` under
gunicorn, bound to a Unix socket that dockerd discovers in
/run/docker/plugins. Settings come from flags or ``SECUREVOL_*`` environment
variables (see ``config.py`` and ``securevol serve --help``).
"""

import argparse
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gunicorn.app.base import BaseApplication

from securevol import __version__, config
from securevol.access import ACCESS_FILE, read_access_file, recorded_default_policy, update_access_file
from securevol.api import create_app
from securevol.audit import AuditLog
from securevol.driver import VolumeDriver, prepare_state_dir
from securevol.errors import SecurevolError, VolumeNotFound
from securevol.log import setup_logging
from securevol.policy import parse_allowlist
from securevol.registry import Registry
from securevol.rekey import rekey as run_rekey
from securevol.syscalls import forbid_core_dumps

# Named, not __name__: run as 'python -m securevol.cli', this module is __main__,
# whose logger is outside the securevol hierarchy that setup_logging configures.
log = logging.getLogger("securevol.cli")

# The socket must be reachable by root (dockerd) only. gunicorn binds it under
# this umask, so it is never world-accessible, not even for a moment.
SOCKET_MODE = 0o660
DAEMON_LOCK_FILE = "daemon.lock"
# How long a starting daemon waits for the workers of a killed one to release the socket.
ORPHAN_WAIT_SECONDS = 10.0
PROBE_TIMEOUT_SECONDS = 2.0
DOCKER_PLUGIN_DIR = "/run/docker/plugins"
_SOCKET_UMASK = 0o777 & ~SOCKET_MODE

# A worker that handles one request longer than this is killed by gunicorn.
# Mount waits up to --mount-timeout for the FUSE process, and Unmount up to
# about 30 seconds for a FUSE process to exit, so leave room for both.
_WORKER_TIMEOUT_MARGIN = 60
_THREADS_PER_WORKER = 8

# The settings that 'securevol allow' reads; the others belong to the daemon alone.
_ADMIN_SETTINGS = ("state_dir", "default_policy", "log_level")
# The settings that 'securevol rekey' reads; Transit's come from SECUREVOL_TRANSIT_* variables.
_REKEY_SETTINGS = ("state_dir", "key_provider", "master_key", "log_level")
# Help texts of the admin commands for settings that the daemon uses another way.
_ADMIN_HELP = {
    "state_dir": "the state directory that the daemon uses",
    "log_level": "log level of this command's messages on stderr: DEBUG, INFO, WARNING or ERROR",
    "key_provider": "the key provider that the daemon uses: local or transit",
    "master_key": "the master key file that the daemon uses, which gets the new key "
    "(default: STATE_DIR/master.key)",
}

# How long a stopping worker may finish its requests. systemd kills the daemon
# 30 s (TimeoutStopSec) after SIGTERM. With gunicorn's default of 30 s, a
# client that sent half a request kept a worker busy until that kill. A Mount
# or Unmount cut short here may leave a FUSE process behind, which the next
# Mount of the volume replaces or adopts and Remove stops.
GRACEFUL_STOP_SECONDS = 10


class PluginServer(BaseApplication):
    """gunicorn running the plugin app, configured in code rather than from a gunicorn.conf.py."""

    def __init__(self, app, settings: config.Settings, state_lock: int | None = None) -> None:
        self._app = app
        self._settings = settings
        self._state_lock = state_lock
        super().__init__()

    def load_config(self) -> None:
        settings = self._settings
        values = {
            "bind": [f"unix:{settings.socket}"],
            "umask": _SOCKET_UMASK,
            "workers": settings.workers,
            # Threads let a worker answer dockerd's authorization requests while
            # another of its requests waits for dockerd: a Mount asks the Engine
            # API which container is starting, and an authorization plugin is
            # asked about that API call before dockerd answers it.
            "worker_class": "gthread",
            "threads": _THREADS_PER_WORKER,
            "timeout": int(settings.mount_timeout) + _WORKER_TIMEOUT_MARGIN,
            "graceful_timeout": GRACEFUL_STOP_SECONDS,
            "preload_app": True,
            "proc_name": "securevol",
            # gunicorn 25+ opens a control socket at a path shared by every
            # gunicorn of the user; the plugin needs none.
            "control_socket_disable": True,
            "errorlog": "-",
            "accesslog": "-" if settings.log_level == "DEBUG" else None,
            "loglevel": settings.log_level.lower(),
            "when_ready": _check_socket_mode,
            "post_fork": self._release_state_lock_in_worker,
        }
        for key, value in values.items():
            self.cfg.set(key, value)

    def load(self):
        return self._app

    def _release_state_lock_in_worker(self, server, worker) -> None:
        # Only the master holds the state directory's lock: a worker that
        # outlives a killed master must not keep the next daemon from starting.
        if self._state_lock is not None:
            os.close(self._state_lock)


def _check_socket_mode(server) -> None:
    # Set the mode again in case the socket existed before or the umask was
    # ignored: only root (dockerd) may talk to the plugin.
    for listener in server.LISTENERS:
        path = listener.cfg_addr
        os.chmod(path, SOCKET_MODE)
        os.chown(path, os.geteuid(), os.getegid())
        log.info("plugin listening socket=%s workers=%d", path, server.cfg.workers)


class StateDirectoryInUse(SecurevolError):
    """Another daemon holds the state directory's lock."""


def serve(args: argparse.Namespace) -> int:
    """Run the plugin daemon until it receives SIGTERM or SIGINT."""
    # The daemon holds the KEK and unwrapped DEKs; its gunicorn workers inherit this.
    forbid_core_dumps()
    try:
        settings = config.resolve(vars(args))
    except config.ConfigError as exc:
        print(f"securevol: {exc}", file=sys.stderr)
        return 2

    setup_logging(settings.log_level)
    if os.geteuid() != 0:
        # As another user the daemon fails later and less clearly: it cannot
        # create /var/lib/securevol, chown a volume's root to its uid option, or
        # make FUSE mounts that dockerd and the containers may open.
        log.error("daemon start failed error=not running as root euid=%d", os.geteuid())
        print(
            "securevol: securevol serve needs root to mount FUSE filesystems for dockerd, "
            "so run it with sudo.",
            file=sys.stderr,
        )
        return 1

    if _socket_in_use(settings.socket):
        # gunicorn would replace the socket file, and whichever daemon stops
        # first would unlink it, leaving the other one running but unreachable.
        log.error("daemon start failed error=socket in use socket=%s", settings.socket)
        print(
            f"securevol: Another process already listens on {settings.socket}; stop it first, "
            "or give this daemon another --socket.",
            file=sys.stderr,
        )
        return 1

    try:
        prepare_state_dir(settings)  # the owner check comes before the lock file is opened
        state_lock = _lock_state_dir(settings.state_dir)
    except SecurevolError as exc:
        if isinstance(exc, StateDirectoryInUse):
            log.error("daemon start failed error=state directory in use state_dir=%s", settings.state_dir)
        else:
            log.error("daemon start failed error=%s", exc)
        print(f"securevol: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        log.error("daemon start failed error=%s", exc)
        print(f"securevol: Failed to lock the state directory {settings.state_dir}: {exc.strerror or exc}.", file=sys.stderr)
        return 1

    try:
        driver = VolumeDriver.from_settings(settings)
        settings.socket.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except (SecurevolError, OSError) as exc:
        log.error("daemon start failed error=%s", exc)
        print(f"securevol: {exc}", file=sys.stderr)
        return 1

    if not _discoverable(settings.socket):
        log.warning(
            "socket outside dockerd's plugin directory socket=%s: dockerd finds a plugin only as "
            "%s/NAME.sock or through a spec file in /etc/docker/plugins",
            settings.socket, DOCKER_PLUGIN_DIR,
        )
    log.info(
        "daemon starting state_dir=%s mount_root=%s key_provider=%s default_policy=%s",
        settings.state_dir, settings.mount_root, settings.key_provider, settings.default_policy,
    )
    # The lock ends with this process. Workers return through here too (gunicorn
    # exits them with sys.exit), after their post_fork hook closed their copy.
    PluginServer(create_app(settings, driver), settings, state_lock).run()
    return 0


def _lock_state_dir(state_dir: Path) -> int:
    """Take the state directory's daemon lock for the life of this process; return its descriptor.

    Two daemons on one state directory would each count mounts and start
    FUSE processes for the same volumes. The lock is an flock(2) on
    STATE/daemon.lock, so it ends with the process, and the descriptor is
    not inherited by FUSE processes, so a restarted daemon can take it.
    """
    path = state_dir / DAEMON_LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateDirectoryInUse(
            f"Another securevol daemon (PID {holder}) uses the state directory {state_dir}; stop it first, "
            "or give this daemon another --state-dir."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _discoverable(socket_path: Path) -> bool:
    """Tell whether dockerd finds *socket_path* by itself: NAME.sock or NAME/NAME.sock in its plugin directory."""
    plugin_dir = Path(DOCKER_PLUGIN_DIR)
    if socket_path.suffix != ".sock":
        return False
    if socket_path.parent == plugin_dir:
        return True
    return socket_path.parent.parent == plugin_dir and socket_path.parent.name == socket_path.stem


def _socket_in_use(path: Path) -> bool:
    """Return whether a process accepts connections on the Unix socket *path*.

    A socket file left by a daemon that died refuses connections and may be
    replaced. When the process that listened on it is gone but the socket
    still accepts, gunicorn workers of a killed daemon may hold it: they leave
    within a second or two, so wait up to ORPHAN_WAIT_SECONDS for that rather
    than fail a restart (systemd restarts the unit after 2 s). Whatever still
    accepts after the wait counts as a live process, since a service whose
    listening process forked and exited looks the same.
    """
    deadline = None
    while True:
        listener_pid = _listener_pid(path)
        if listener_pid is None:
            return False
        if listener_pid <= 0 or _process_exists(listener_pid):
            return True

        if deadline is None:
            deadline = time.monotonic() + ORPHAN_WAIT_SECONDS
            log.info("waiting for a stopped daemon's workers to release the socket socket=%s pid=%d",
                     path, listener_pid)
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def _listener_pid(path: Path) -> int | None:
    """Return the PID that listened on *path*, 0 if unknown, or None if nothing accepts connections there."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A listener that is stopped with a full backlog would block connect(2) for good.
    probe.settimeout(PROBE_TIMEOUT_SECONDS)
    try:
        probe.connect(os.fspath(path))
        return _peer_pid(probe)
    except (TimeoutError, BlockingIOError):
        return 0  # a listener whose backlog is full (EAGAIN) or that does not accept in time
    except OSError:
        return None  # refused, missing, or not a socket: nothing accepts connections there
    finally:
        probe.close()


def _peer_pid(connected: socket.socket) -> int:
    """Return the PID that called listen(2) on the other end of *connected*, 0 if unknown."""
    credentials = connected.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", credentials)
    return pid


def _process_exists(pid: int) -> bool:
    """Tell whether *pid* runs; a zombie, which a killed process is until it is reaped, does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the command name, which may itself contain ')'.
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def allow_show(args: argparse.Namespace) -> int:
    """Print the allowlist of a volume."""
    settings, registry = _settings_and_registry(args)
    record = registry.read_volume(args.volume)
    rules = record.options.get("allow")
    if rules is not None:
        print(parse_allowlist(rules).text)
    elif _denies_by_default(settings, registry, args.volume):
        print("(no allowlist: the daemon's default policy denies every container)")
    else:
        print("(no allowlist: every container may use the volume)")
    return 0


def allow_set(args: argparse.Namespace) -> int:
    """Replace the allowlist of a volume; a running FUSE process applies it within a second."""
    settings, registry = _settings_and_registry(args)
    parse_allowlist(args.rules)  # raises AllowlistError with the position of the error
    audit = _writable_audit_log(settings, registry, args.volume)
    with registry.changing_mounts(args.volume) as record:
        previous = record.options.get("allow")
        registry.update_options(args.volume, {**record.options, "allow": args.rules})
        update_access_file(registry.volume_dir(args.volume) / ACCESS_FILE, args.rules)
    log.info("allowlist changed vol=%s rules=%s previous=%s", args.volume, args.rules, previous or "-")
    audit.record_change(
        action="allow set", volume=args.volume, rules=args.rules, previous=previous or ""
    )
    print(f"Volume {args.volume!r} now allows: {args.rules}")
    return 0


def allow_clear(args: argparse.Namespace) -> int:
    """Remove the allowlist of a volume, which then follows the daemon's default policy."""
    settings, registry = _settings_and_registry(args)
    audit = _writable_audit_log(settings, registry, args.volume)
    with registry.changing_mounts(args.volume) as record:
        previous = record.options.get("allow")
        options = {name: value for name, value in record.options.items() if name != "allow"}
        registry.update_options(args.volume, options)
        update_access_file(registry.volume_dir(args.volume) / ACCESS_FILE, None)
    log.info("allowlist removed vol=%s previous=%s", args.volume, previous or "-")
    audit.record_change(
        action="allow clear", volume=args.volume, rules="", previous=previous or ""
    )
    if _denies_by_default(settings, registry, args.volume):
        print(f"Volume {args.volume!r} has no allowlist now; the default policy denies every container.")
    else:
        print(f"Volume {args.volume!r} has no allowlist now; every container may use it.")
    return 0


def _writable_audit_log(settings: config.Settings, registry: Registry, volume: str) -> AuditLog:
    """Return the daemon's audit log for *volume*, or raise SecurevolError before any change if it cannot be written.

    Run from the host against a managed plugin's state directory, the access file names the
    audit log by its path inside the plugin, which the host does not have.
    """
    registry.read_volume(volume)  # raises VolumeNotFound, which has its own message
    audit = _audit_log_of(settings, registry, volume)
    if settings.audit_log is None and audit.path == os.fspath(settings.audit_log_path):
        # The default log directory, which a daemon that never started on this state directory did not make.
        settings.log_dir.mkdir(mode=0o700, exist_ok=True)
    try:
        audit.check_writable()
    except OSError as exc:
        raise SecurevolError(
            f"The audit log {audit.path} cannot be written ({exc.strerror}), so the allowlist of volume "
            f"{volume!r} was not changed; run this command where the daemon's paths are valid, for the "
            "managed plugin inside the plugin (docs/install.md, \"Admin commands\")."
        ) from None
    return audit


def _audit_log_of(settings: config.Settings, registry: Registry, volume: str) -> AuditLog:
    """Return the audit log that the daemon uses: the one named in the volume's access file, if it has one."""
    try:
        path = read_access_file(registry.volume_dir(volume) / ACCESS_FILE).audit_log
    except (OSError, ValueError):
        path = None
    return AuditLog(path or settings.audit_log_path)


def _denies_by_default(settings: config.Settings, registry: Registry, volume: str) -> bool:
    """Tell whether the daemon's default policy denies *volume*.

    The volume's access file records it once the volume was mounted, the state
    directory once a daemon started on it; --default-policy is the last resort.
    """
    try:
        return read_access_file(registry.volume_dir(volume) / ACCESS_FILE).deny_by_default
    except (OSError, ValueError):
        pass
    try:
        recorded = recorded_default_policy(settings.state_dir)
    except OSError:
        recorded = None
    return settings.deny_by_default if recorded is None else recorded


def rekey(args: argparse.Namespace) -> int:
    """Wrap every volume's DEK under a new KEK: a new master key, or the newest Transit key version."""
    # With the local provider this process has every volume's DEK in memory for a moment.
    forbid_core_dumps()
    settings = config.resolve(vars(args))
    setup_logging(settings.log_level)
    if not settings.state_dir.is_dir():
        raise SecurevolError(f"The state directory {settings.state_dir} does not exist; give the --state-dir "
                             "that the daemon uses.")

    result = run_rekey(settings, rotate_transit_key=args.rotate_transit_key)
    if result.provider == "local":
        print(f"Rewrapped {len(result.rewrapped)} volume(s) under master key {result.new_key} "
              f"(was {result.old_key}).")
    else:
        print(f"Rewrapped {len(result.rewrapped)} volume(s) under Transit key version {result.new_key or '-'}.")
    if result.other_provider:
        print(f"Left alone, wrapped by another key provider: {', '.join(result.other_provider)}.")
    return 0


def _settings_and_registry(args: argparse.Namespace) -> tuple[config.Settings, Registry]:
    settings = config.resolve(vars(args))
    setup_logging(settings.log_level)
    if not settings.state_dir.is_dir():
        # Without this check, allow set fails on the missing registry.lock with a traceback.
        raise VolumeNotFound(f"Volume {args.volume!r} does not exist.")
    return settings, Registry(settings.state_dir)


def _run_admin(command):
    """Wrap an admin command so that expected errors print one line and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except config.ConfigError as exc:
            print(f"securevol: {exc}", file=sys.stderr)
            return 2
        except VolumeNotFound as exc:
            if not hasattr(args, "volume"):
                print(f"securevol: {exc}", file=sys.stderr)
                return 1
            # The usual cause is a daemon that runs with another state directory.
            state_dir = config.resolve(vars(args)).state_dir
            print(
                f"securevol: Volume {args.volume!r} does not exist in {state_dir}; give the --state-dir "
                "that the daemon uses, or for the managed plugin run this command inside the plugin "
                "(docs/install.md, \"Admin commands\").",
                file=sys.stderr,
            )
            return 1
        except SecurevolError as exc:
            print(f"securevol: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"securevol: {_describe_os_error(exc)}", file=sys.stderr)
            return 1

    return run


def _describe_os_error(exc: OSError) -> str:
    where = f" on {exc.filename}" if exc.filename else ""
    hint = "; run it as the daemon's user (root)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
    return f"{exc.strerror or exc}{where}{hint}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="securevol",
        description="Docker volume plugin that keeps each volume encrypted at rest.",
    )
    parser.add_argument("--version", action="version", version=f"securevol {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve_parser = commands.add_parser(
        "serve",
        help="run the volume plugin daemon",
        description="Run the volume plugin daemon on a Unix socket for dockerd. Each option can also be "
        "set by the environment variable named in its help; a flag wins over its variable.",
    )
    config.add_arguments(serve_parser)
    serve_parser.set_defaults(func=serve, parser=serve_parser)

    allow_parser = commands.add_parser(
        "allow",
        help="show or change the allowlist of a volume",
        description="Show or change which containers may use a volume (the 'allow' option; syntax in "
        "docs/allowlist.md). It reads the daemon's state directory, so give the --state-dir that the "
        "daemon uses, by flag or by SECUREVOL_STATE_DIR. The daemon's default policy is read from there; "
        "--default-policy counts only for a state directory that no daemon has started on.",
    )
    # The settings are taken before the action too: 'allow --state-dir DIR show VOLUME'.
    config.add_arguments(allow_parser, _ADMIN_SETTINGS, _ADMIN_HELP)
    allow_commands = allow_parser.add_subparsers(dest="allow_command", metavar="ACTION", required=True)
    show_parser = allow_commands.add_parser("show", help="print the allowlist of VOLUME")
    show_parser.add_argument("volume", metavar="VOLUME", help="name of the volume, as in docker volume ls")
    config.add_arguments(show_parser, _ADMIN_SETTINGS, _ADMIN_HELP, default=argparse.SUPPRESS)
    show_parser.set_defaults(func=_run_admin(allow_show), parser=show_parser)
    set_parser = allow_commands.add_parser(
        "set", help="replace the allowlist of VOLUME with RULES, e.g. 'service:db,name:backup'"
    )
    set_parser.add_argument("volume", metavar="VOLUME", help="name of the volume, as in docker volume ls")
    set_parser.add_argument(
        "rules", metavar="RULES", help="comma-separated rules such as name:NAME, service:SVC or host"
    )
    config.add_arguments(set_parser, _ADMIN_SETTINGS, _ADMIN_HELP, default=argparse.SUPPRESS)
    set_parser.set_defaults(func=_run_admin(allow_set), parser=set_parser)
    clear_parser = allow_commands.add_parser(
        "clear", help="remove the allowlist of VOLUME; the daemon's --default-policy then decides"
    )
    clear_parser.add_argument("volume", metavar="VOLUME", help="name of the volume, as in docker volume ls")
    config.add_arguments(clear_parser, _ADMIN_SETTINGS, _ADMIN_HELP, default=argparse.SUPPRESS)
    clear_parser.set_defaults(func=_run_admin(allow_clear), parser=clear_parser)

    rekey_parser = commands.add_parser(
        "rekey",
        help="wrap every volume's key under a new master key or Transit key version",
        description="Wrap the data key (DEK) of every volume under a new key-encryption key. With the "
        "local provider, a new random master key replaces the one in the master key file; with transit, "
        "each record is rewrapped under the newest version of the Transit key. The volumes' ciphertext "
        "does not change, and the daemon may keep running. Give the settings the daemon uses.",
    )
    rekey_parser.add_argument(
        "--rotate-transit-key", action="store_true",
        help="first add a new version of the Transit key (the token needs update on MOUNT/keys/KEY/rotate)",
    )
    config.add_arguments(rekey_parser, _REKEY_SETTINGS, _ADMIN_HELP)
    rekey_parser.set_defaults(func=_run_admin(rekey), parser=rekey_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        # parse_args would report them with the usage of 'securevol' rather than of the command.
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
