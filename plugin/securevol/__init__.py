"""securevol: a Docker volume plugin that stores each volume as authenticated ciphertext."""

__version__ = "0.2.0"
