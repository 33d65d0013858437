"""Key providers: they wrap and unwrap each volume's DEK with a key-encryption key (KEK).

A provider never stores a DEK in clear. ``wrap`` returns a JSON-serialisable
record that the registry stores as ``dek.json``; it names the provider and
the KEK it used, and holds only ciphertext. ``unwrap`` reverses it. Both bind
the volume ID to the wrapped DEK, so a record copied to another volume does
not unwrap there.

Providers are looked up by name in ``PROVIDERS``. Each entry names a module
that defines ``create_provider(settings) -> KeyProvider``. The module is
imported only when its provider is configured, so an optional dependency
(hvac for ``transit``) is needed only by those who use it.
"""

import abc
import importlib
from typing import Any

from securevol.crypto import DataKey
from securevol.errors import KeyProviderError

# Provider name -> module that defines create_provider(settings).
PROVIDERS: dict[str, str] = {
    "local": "securevol.keys.local",
    "transit": "securevol.keys.transit",
}


class KeyProvider(abc.ABC):
    """Wraps and unwraps DEKs with a KEK that it keeps to itself.

    Implementations raise KeyProviderError with one sentence a user can act
    on, naming no key material, token or response body.
    """

    name: str

    @abc.abstractmethod
    def wrap(self, dek: DataKey, volume_id: bytes) -> dict[str, Any]:
        """Return a record holding *dek* encrypted under the KEK and bound to *volume_id*.

        The record contains at least ``"provider"`` (this provider's name) and
        an identifier of the KEK, never the DEK.
        """

    @abc.abstractmethod
    def unwrap(self, record: dict[str, Any], volume_id: bytes) -> DataKey:
        """Return the DEK inside *record*, which must have been wrapped for *volume_id*."""


def create_provider(settings: Any) -> KeyProvider:
    """Build the key provider named by ``settings.key_provider``."""
    name = settings.key_provider
    module_name = PROVIDERS.get(name)
    if module_name is None:
        known = ", ".join(sorted(PROVIDERS))
        raise KeyProviderError(f"Unknown key provider {name!r}; known providers are: {known}.")

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KeyProviderError(
            f"Key provider {name!r} is not available ({exc}); install securevol with its extra dependencies."
        ) from exc
    return module.create_provider(settings)


def check_record_provider(provider: KeyProvider, record: dict[str, Any]) -> None:
    """Raise KeyProviderError unless *record* was wrapped by a provider of *provider*'s kind."""
    wrapped_by = record.get("provider") if isinstance(record, dict) else None
    if wrapped_by != provider.name:
        raise KeyProviderError(
            f"The volume's key was wrapped by key provider {wrapped_by!r}, but the daemon runs "
            f"{provider.name!r}; start the daemon with --key-provider {wrapped_by}."
        )
