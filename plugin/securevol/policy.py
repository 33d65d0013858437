"""Allowlists: which containers may see a volume's plaintext.

A volume's ``allow`` option is a comma-separated list of rules. A container
that matches any one rule is allowed::

    name:PATTERN              container name, exact or with the wildcards * and ?
    image:REFERENCE           image name[:tag] or name@sha256:DIGEST, normalised as Docker
                              does (postgres = docker.io/library/postgres:latest),
                              or an image ID sha256:HEX
    label:KEY=VALUE           a container label with exactly that value
    service:SERVICE           a Compose service (label com.docker.compose.service)
    service:PROJECT/SERVICE   the same, in one Compose project (label com.docker.compose.project)
    host                      processes on the host, outside any container; only the
                              per-access check in the FUSE process meets them

Spaces around a rule are ignored; a value cannot contain a comma. A parse error
names the 1-based character position in the option value where it was found.

A volume without an ``allow`` option is open to every container, unless the
daemon denies by default; ``resolve_allowlist`` turns both cases into an
``Allowlist``.
"""

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from securevol.errors import InvalidOption

MAX_ALLOWLIST_LEN = 4096

COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"

RULE_KINDS = ("name", "image", "label", "service", "host")

# Docker container names are [a-zA-Z0-9][a-zA-Z0-9_.-]+; patterns add * and ?.
_NAME_PATTERN_CHARS = re.compile(r"[A-Za-z0-9_.*?-]")
# Compose project names (compose-spec) and service names (compose-go loader).
_PROJECT_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SERVICE_CHARS = re.compile(r"[A-Za-z0-9._-]")

# The grammar of image references in github.com/distribution/reference.
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_RE = re.compile(
    r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"(?::[0-9]+)?"
)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128}")
_IMAGE_ID_RE = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
_MAX_IMAGE_NAME_LEN = 255
_DEFAULT_DOMAIN = "docker.io"
_LEGACY_DEFAULT_DOMAIN = "index.docker.io"
_OFFICIAL_REPO_PREFIX = "library/"


class AllowlistError(InvalidOption):
    """An ``allow`` option that does not parse; ``position`` is the 1-based character position."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


class ImageReferenceError(ValueError):
    """An image reference that Docker would not accept; ``offset`` is the 0-based index of the fault."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class Rule:
    """One allowlist rule: its kind, its value in canonical form and the text as written."""

    kind: str
    value: str
    text: str

    def __str__(self) -> str:
        return self.text


# The rule an open allowlist (no ``allow`` option, daemon allows by default) reports as matched.
OPEN_RULE = Rule("open", "", "no allowlist")


@dataclass(frozen=True)
class ContainerInfo:
    """What the allowlist is matched against: one container as Docker describes it.

    ``image`` is the reference the container was created with, as the user wrote
    it. ``image_refs`` are the image's normalised tags and digests, from an image
    inspect, or None when they were not looked up. ``image_id`` is ``sha256:HEX``.
    """

    id: str
    name: str
    image: str = ""
    image_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    image_refs: frozenset[str] | None = None

    def short_id(self) -> str:
        return self.id[:12]


@dataclass(frozen=True)
class Allowlist:
    """The rules of one volume; ``open`` means every container and the host are allowed."""

    rules: tuple[Rule, ...]
    open: bool = False

    @property
    def text(self) -> str:
        """The allowlist in canonical option syntax ("" for an open one)."""
        return ",".join(rule.text for rule in self.rules)

    def has_kind(self, kind: str) -> bool:
        return any(rule.kind == kind for rule in self.rules)

    def match(self, container: ContainerInfo) -> Rule | None:
        """Return the first rule that allows *container*, or None if no rule does."""
        if self.open:
            return OPEN_RULE
        for rule in self.rules:
            if _MATCHERS[rule.kind](rule, container):
                return rule
        return None

    def match_host(self) -> Rule | None:
        """Return the rule that lets host processes in (``host``), or None."""
        if self.open:
            return OPEN_RULE
        for rule in self.rules:
            if rule.kind == "host":
                return rule
        return None


OPEN = Allowlist(rules=(), open=True)
DENY_ALL = Allowlist(rules=())


def resolve_allowlist(option: str | None, *, deny_by_default: bool = False) -> Allowlist:
    """Return the allowlist a volume enforces, given its ``allow`` option (None when it has none)."""
    if option is not None:
        return parse_allowlist(option)
    return DENY_ALL if deny_by_default else OPEN


def parse_allowlist(text: str) -> Allowlist:
    """Parse an ``allow`` option value; raise AllowlistError naming the position of the first error."""
    if not isinstance(text, str):
        raise AllowlistError("The allowlist must be a string.", 1)
    if len(text) > MAX_ALLOWLIST_LEN:
        raise AllowlistError(
            f"The allowlist is {len(text)} characters long; the maximum is {MAX_ALLOWLIST_LEN}.",
            MAX_ALLOWLIST_LEN + 1,
        )
    if not text.strip():
        raise _error(0, "the allowlist is empty; give rules such as 'name:web,service:db', or 'host' "
                     "to let only host processes in")

    rules = []
    offset = 0
    for raw in text.split(","):
        rules.append(_parse_rule(raw, offset))
        offset += len(raw) + 1
    return Allowlist(rules=tuple(rules))


def _parse_rule(raw: str, offset: int) -> Rule:
    """Parse one comma-separated item that starts at 0-based *offset* in the option value."""
    stripped = raw.strip()
    start = offset + (len(raw) - len(raw.lstrip()))
    if not stripped:
        raise _error(start, "an empty rule; remove the extra comma")

    if stripped == "host":
        return Rule("host", "", "host")
    kind, sep, value = stripped.partition(":")
    if kind == "host":
        raise _error(start, "'host' takes no value; write just 'host'")
    if kind not in RULE_KINDS:
        raise _error(start, f"unknown rule {kind!r}; rules are name:, image:, label:, service: and host")
    if not sep:
        raise _error(start, f"the {kind!r} rule needs a value after ':', for example {_EXAMPLES[kind]!r}")

    value_start = start + len(kind) + 1
    if not value:
        raise _error(value_start, f"the {kind!r} rule has an empty value, for example {_EXAMPLES[kind]!r}")
    canonical = _VALUE_PARSERS[kind](value, value_start)
    return Rule(kind, canonical, stripped)


_EXAMPLES = {
    "name": "name:web",
    "image": "image:postgres:16",
    "label": "label:com.example.role=db",
    "service": "service:db",
}


def _error(offset: int, what: str) -> AllowlistError:
    position = offset + 1
    return AllowlistError(f"Invalid allowlist at character {position}: {what}.", position)


def _parse_name(value: str, start: int) -> str:
    # Docker stores names with a leading "/", and inspect shows them that way.
    pattern = value[1:] if value.startswith("/") else value
    skipped = len(value) - len(pattern)
    if not pattern:
        raise _error(start, "the container name is empty")
    for index, char in enumerate(pattern):
        if not _NAME_PATTERN_CHARS.fullmatch(char):
            raise _error(
                start + skipped + index,
                f"{char!r} cannot appear in a container name; use letters, digits, '_', '.', '-' "
                "and the wildcards '*' and '?'",
            )
    return pattern


def _parse_image(value: str, start: int) -> str:
    try:
        return normalize_image_reference(value)
    except ImageReferenceError as exc:
        raise _error(start + exc.offset, str(exc)) from None


def _parse_label(value: str, start: int) -> str:
    key, sep, label_value = value.partition("=")
    if not sep:
        raise _error(start + len(value), "a label rule needs '=', as in label:com.example.role=db")
    if not key:
        raise _error(start, "the label key is empty")
    for index, char in enumerate(value):
        if not char.isprintable():
            raise _error(start + index, f"{char!r} cannot appear in a label rule")
    return value


def _parse_service(value: str, start: int) -> str:
    project, sep, service = value.rpartition("/")
    service_start = start + len(project) + len(sep)
    if sep:
        if not _PROJECT_RE.fullmatch(project):
            raise _error(
                start,
                f"invalid Compose project {project!r}; project names use lowercase letters, digits, "
                "'_' and '-', starting with a letter or digit",
            )
    if not service:
        raise _error(service_start, "the service name is empty")
    for index, char in enumerate(service):
        if not _SERVICE_CHARS.fullmatch(char):
            raise _error(
                service_start + index,
                f"{char!r} cannot appear in a Compose service name; use letters, digits, '.', '_' and '-'",
            )
    return value


_VALUE_PARSERS = {
    "name": _parse_name,
    "image": _parse_image,
    "label": _parse_label,
    "service": _parse_service,
}


# -- image references ----------------------------------------------------------


def normalize_image_reference(reference: str) -> str:
    """Return *reference* in the fully qualified form Docker resolves it to.

    ``postgres`` becomes ``docker.io/library/postgres:latest``, ``user/app:1``
    becomes ``docker.io/user/app:1``, and ``index.docker.io/x`` becomes
    ``docker.io/library/x:latest``. A digest reference keeps its digest and
    drops any tag, because Docker pulls it by the digest. An image ID (64 hex
    digits, with or without ``sha256:``) becomes ``sha256:HEX``. Raises
    ImageReferenceError where Docker's reference parser fails.
    """
    id_match = _IMAGE_ID_RE.fullmatch(reference)
    if id_match:
        return f"sha256:{id_match.group(1)}"

    name_and_tag, at, digest = reference.partition("@")
    if at and not _DIGEST_RE.fullmatch(digest):
        raise ImageReferenceError(
            f"invalid image digest {digest!r}; write it as sha256: followed by 64 lowercase hex digits",
            len(name_and_tag) + 1,
        )

    name, tag = _split_tag(name_and_tag)
    domain, path = _split_domain(name)
    _check_path(path, len(name) - len(path))
    if len(name) > _MAX_IMAGE_NAME_LEN:
        raise ImageReferenceError(f"the image name is longer than {_MAX_IMAGE_NAME_LEN} characters", 0)

    if domain == _DEFAULT_DOMAIN and "/" not in path:
        path = _OFFICIAL_REPO_PREFIX + path
    full_name = f"{domain}/{path}"
    if digest:
        return f"{full_name}@{digest}"
    return f"{full_name}:{tag or 'latest'}"


def _split_tag(name_and_tag: str) -> tuple[str, str]:
    colon = name_and_tag.rfind(":")
    if colon <= name_and_tag.rfind("/"):
        return name_and_tag, ""
    tag = name_and_tag[colon + 1 :]
    if not _TAG_RE.fullmatch(tag):
        raise ImageReferenceError(
            f"invalid image tag {tag!r}; tags use letters, digits, '_', '.' and '-' (at most 128)",
            colon + 1,
        )
    return name_and_tag[:colon], tag


def _split_domain(name: str) -> tuple[str, str]:
    """Split off the registry, as Docker's ParseNormalizedNamed does, and check it."""
    slash = name.find("/")
    first = name[:slash]
    is_domain = slash != -1 and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if not is_domain:
        return _DEFAULT_DOMAIN, name

    if not _DOMAIN_RE.fullmatch(first):
        raise ImageReferenceError(f"invalid registry host {first!r}", 0)
    domain = _DEFAULT_DOMAIN if first == _LEGACY_DEFAULT_DOMAIN else first
    return domain, name[slash + 1 :]


def _check_path(path: str, start: int) -> None:
    if not path:
        raise ImageReferenceError("the image name is empty", start)
    offset = start
    for component in path.split("/"):
        if _PATH_COMPONENT_RE.fullmatch(component):
            offset += len(component) + 1
            continue
        if component and _PATH_COMPONENT_RE.fullmatch(component.lower()):
            raise ImageReferenceError(f"image names must be lowercase, not {component!r}", offset)
        raise ImageReferenceError(
            f"invalid image name part {component!r}; use lowercase letters and digits separated by "
            "'.', '_', '__' or '-'",
            offset,
        )


def image_refs_of(image: str) -> frozenset[str]:
    """Return the normalised reference of a container's configured *image*, if it names one for sure.

    A string of hex digits may be an image ID prefix, which dockerd resolves
    to any image whose ID starts with it, so it names no reference.
    """
    if re.fullmatch(r"(?:sha256:)?[0-9a-f]+", image) and not _IMAGE_ID_RE.fullmatch(image):
        return frozenset()
    try:
        return frozenset({normalize_image_reference(image)})
    except ImageReferenceError:
        return frozenset()


def normalize_image_refs(refs: object) -> frozenset[str]:
    """Normalise the RepoTags and RepoDigests of an image inspect, skipping ``<none>`` entries."""
    result = set()
    for ref in refs if isinstance(refs, list) else ():
        if not isinstance(ref, str) or ref.startswith("<none>"):
            continue
        try:
            result.add(normalize_image_reference(ref))
        except ImageReferenceError:
            continue
    return frozenset(result)


# -- matching --------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _compile_name_pattern(pattern: str) -> re.Pattern[str]:
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


def _match_name(rule: Rule, container: ContainerInfo) -> bool:
    name = container.name.removeprefix("/")
    return bool(name) and _compile_name_pattern(rule.value).fullmatch(name) is not None


def _match_image(rule: Rule, container: ContainerInfo) -> bool:
    if rule.value.startswith("sha256:") and "/" not in rule.value:
        return container.image_id == rule.value
    # The reference the container was created with counts even after its tag
    # moved to a newer image, so that a container keeps its access across a pull.
    if rule.value in image_refs_of(container.image):
        return True
    return container.image_refs is not None and rule.value in container.image_refs


def _match_label(rule: Rule, container: ContainerInfo) -> bool:
    key, _, value = rule.value.partition("=")
    return container.labels.get(key) == value


def _match_service(rule: Rule, container: ContainerInfo) -> bool:
    project, sep, service = rule.value.rpartition("/")
    if container.labels.get(COMPOSE_SERVICE_LABEL) != service:
        return False
    return not sep or container.labels.get(COMPOSE_PROJECT_LABEL) == project


def _match_nothing(rule: Rule, container: ContainerInfo) -> bool:
    # "host" allows processes outside containers; no container is one.
    return False


_MATCHERS = {
    "name": _match_name,
    "image": _match_image,
    "label": _match_label,
    "service": _match_service,
    "host": _match_nothing,
}
