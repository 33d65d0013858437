"""Logging set-up shared by the plugin daemon, the FUSE processes and the CLI.

Lines look like ``2026-12-04T21:30:00Z INFO securevol.driver: volume created vol=db``:
the event first, then ``key=value`` pairs, so that operators can grep for
``vol=db`` or ``event`` words. Messages never contain key material, tokens,
passphrases or plaintext file names.
"""

import logging
import os
import sys
import time

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def setup_logging(level: str | None = None, stream=None) -> None:
    """Send every securevol logger to *stream* (stderr by default) at *level*.

    *level* falls back to the ``SECUREVOL_LOG_LEVEL`` environment variable, then INFO.
    """
    level_name = (level or os.environ.get("SECUREVOL_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)

    root = logging.getLogger("securevol")
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    root.propagate = False
