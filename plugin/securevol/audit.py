"""The audit log of allowlist decisions: one JSON object per line, and the ``securevol.audit`` logger.

Every allow or deny decision that involves a securevol volume is recorded
with the time, the enforcement point (``authz``, ``mount`` or ``access``),
the action, the volume, the container (ID, name, image) and the rule that
matched, and so is every change of a volume's rules by ``securevol allow``.
Records never hold file contents, plaintext file names or keys.

Several processes append to the same file (gunicorn workers and FUSE
processes): each record is a single ``write(2)`` on a descriptor opened with
O_APPEND, so lines do not interleave. The file is reopened for each record,
so that log rotation by renaming works without a signal.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from securevol.policy import ContainerInfo, Rule

log = logging.getLogger("securevol.audit")

POINTS = ("authz", "mount", "access")


@dataclass(frozen=True)
class AuditRecord:
    """One decision; empty strings stand for what is not known at that point (a new container's ID)."""

    time: str
    decision: str  # "allow" or "deny", or "change" for a change of the rules
    point: str  # "authz", "mount" or "access", or "cli" for a change of the rules
    action: str  # what was asked: "create", "rename", "archive", "exec", "mount", "open", ...
    volume: str
    container_id: str
    container_name: str
    image: str
    rule: str  # the rule that matched, "" on a deny
    reason: str  # why, in a few words, for a deny or a special case


class AuditLog:
    """Writes audit records to *path* (if given) and to the ``securevol.audit`` logger at INFO."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None

    def __repr__(self) -> str:
        return f"AuditLog(path={self.path!r})"

    def record(
        self,
        *,
        allowed: bool,
        point: str,
        action: str,
        volume: str = "",
        container: ContainerInfo | None = None,
        rule: Rule | None = None,
        reason: str = "",
    ) -> AuditRecord:
        """Record one decision and return the record."""
        if point not in POINTS:
            raise ValueError(f"unknown enforcement point {point!r}")
        entry = AuditRecord(
            time=_now(),
            decision="allow" if allowed else "deny",
            point=point,
            action=action,
            volume=volume,
            container_id=container.id if container else "",
            container_name=container.name if container else "",
            image=container.image if container else "",
            rule=rule.text if rule else "",
            reason=reason,
        )
        self._log(entry)
        if self.path is not None:
            self._append(entry)
        return entry

    def record_change(self, *, action: str, volume: str, rules: str, previous: str) -> AuditRecord:
        """Record a change of a volume's rules by ``securevol allow``, with who ran it, in the file only.

        The command logs the change on its own stderr; the file is where the
        decisions that follow from it are, and where an operator looks.
        """
        operator = f"uid {os.getuid()}"
        if os.environ.get("SUDO_USER"):
            operator += f" (sudo from {os.environ['SUDO_USER']})"
        entry = AuditRecord(
            time=_now(),
            decision="change",
            point="cli",
            action=action,
            volume=volume,
            container_id="",
            container_name="",
            image="",
            rule=rules,
            reason=f"previous rules: {previous or '(none)'}; by {operator}",
        )
        if self.path is not None:
            self._append(entry)
        return entry

    def check_writable(self) -> None:
        """Open the file for appending, creating it if needed; raise OSError if that fails."""
        if self.path is not None:
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def _log(self, entry: AuditRecord) -> None:
        log.info(
            "access %s point=%s action=%s vol=%s container=%s id=%s image=%s rule=%s reason=%s",
            "allowed" if entry.decision == "allow" else "denied",
            entry.point,
            entry.action,
            entry.volume or "-",
            entry.container_name or "-",
            entry.container_id[:12] or "-",
            entry.image or "-",
            _quoted(entry.rule),
            _quoted(entry.reason),
        )

    def _append(self, entry: AuditRecord) -> None:
        line = json.dumps(asdict(entry), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            # The decision is still valid and the logger line above records it;
            # losing the file record must not turn an allow into a failure.
            log.error("audit record not written path=%s error=%s", self.path, exc.strerror)


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False) if text else "-"
