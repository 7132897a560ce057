"""An object store that cannot be reached (or not without credentials), said in one line that
names its endpoint.

botocore and aiohttp raise many kinds of connection errors (refused, reset, timed out), sometimes
wrapped in others, and a DataLoader worker's error comes back as a RuntimeError that only names
the original type.  A user needs one fact from all of them: which endpoint was unreachable.  Only
scheme, host and port are shown, never credentials.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import urlsplit

import aiohttp
import botocore.exceptions

CONNECTION_ERRORS = (
    botocore.exceptions.ConnectionError,  # refused, connect timeout, proxy
    botocore.exceptions.HTTPClientError,  # closed mid-request, read timeout
    aiohttp.ClientConnectionError,
)
CREDENTIAL_ERRORS = (botocore.exceptions.NoCredentialsError,
                     botocore.exceptions.PartialCredentialsError)  # fmt: skip
_STORE_ERRORS = CONNECTION_ERRORS + CREDENTIAL_ERRORS
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker")
_ENDPOINT_IN_MESSAGE = re.compile(r'endpoint URL: "([^"]+)"')


def _worker_error_name(exc: BaseException) -> str | None:
    """The type name of a connection error re-raised from a DataLoader worker, else None."""
    match = _WORKER_ERROR.match(str(exc))
    if match is None:
        return None
    cls = getattr(botocore.exceptions, match[1], None) or getattr(aiohttp, match[1], None)
    return match[1] if isinstance(cls, type) and issubclass(cls, _STORE_ERRORS) else None


def _connection_error(exc: BaseException | None) -> tuple[BaseException, str] | None:
    """The connection or credentials error in `exc`'s chain (causes, contexts) with its type
    name, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _STORE_ERRORS):
            return exc, type(exc).__name__
        name = _worker_error_name(exc)
        if name:
            return exc, name
        exc = exc.__cause__ or exc.__context__
    return None


def endpoint_of(exc: BaseException) -> str:
    """scheme://host[:port] the error names, else the configured one (AWS_ENDPOINT_URL...)."""
    url = getattr(exc, "kwargs", {}).get("endpoint_url")
    match = _ENDPOINT_IN_MESSAGE.search(str(exc))
    url = (
        url
        or (match and match[1])
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if not url:
        return "AWS's default S3 endpoint"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def unreachable_message(exc: BaseException) -> str | None:
    """One line for an error caused by an unreachable object store, or one we have no
    credentials for; None for any other error."""
    found = _connection_error(exc)
    if found is None:
        return None
    error, name = found
    if name in {cls.__name__ for cls in CREDENTIAL_ERRORS}:
        return (f"object store at {endpoint_of(error)}: no credentials ({name}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")  # fmt: skip
    return (
        f"object store at {endpoint_of(error)} unreachable ({name}); nothing committed is lost, "
        "rerun the same command once it is back"
    )


class _LostConnectionTasks(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" reports of connection errors: aiohttp's
    own request tasks end that way when the store goes away mid-request, with a traceback, while
    the job itself already fails with one line naming the endpoint (`unreachable_message`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or _connection_error(exc) is None


def quiet_lost_connections() -> None:
    """Install `_LostConnectionTasks` on asyncio's logger (once); other asyncio reports stay."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _LostConnectionTasks) for f in logger.filters):
        logger.addFilter(_LostConnectionTasks())
