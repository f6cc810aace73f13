"""Hub failures as one line: huggingface_hub and network exceptions become `HubError`s with a hint.

`hub_errors(repo_id, revision)` wraps any block that talks to the Hub (opening a model,
downloading a file, pushing a merge): a missing repo or revision, a gated repo, a rejected token,
offline mode, an HTTP error, a dropped connection or a server that stopped answering becomes a
`HubError` naming the repo, with what to do about it. `scrub` masks every token we know of (and anything shaped like one), so a
token never reaches a message.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from lazymerge.errors import HubError, LazyMergeError
from lazymerge.io.hub_http import bound_client, hub_timeout
from lazymerge.settings import hub_token_values

__all__ = ["hub_errors", "scrub"]


def _secrets(token: object) -> list[str]:
    found = [token] if isinstance(token, str) else []
    found.extend(hub_token_values())
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token

        if stored := get_token():
            found.append(stored)
    return [s for s in found if len(s) >= 4]


def scrub(text: str, token: object = None) -> str:
    """`text` on one line, with every token we know of (and anything shaped like one) masked."""
    for secret in _secrets(token):
        text = text.replace(secret, "***")
    text = re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return " ".join(text.split())


def _server_says(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    message = ""
    if response is not None:
        with contextlib.suppress(Exception):
            message = response.headers.get("X-Error-Message") or ""
        if not message:
            with contextlib.suppress(Exception):
                body = response.json()
                message = body.get("error", "") if isinstance(body, dict) else ""
    if not message:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        message = lines[0] if lines else type(exc).__name__
    return str(message)[:200]


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


@contextlib.contextmanager
def hub_errors(
    repo_id: str, revision: str | None = None, *, token: object = None, writing: bool = False
) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line `HubError`s (tokens masked).

    Every request in the block gets the connect/read timeout of io/hub_http.py (`bound_client`)."""
    try:
        bound_client()
        yield
    except LazyMergeError:
        raise
    except Exception as exc:
        error = _convert(exc, repo_id, revision, writing)
        if error is None:
            raise
        raise HubError(scrub(error.message, token), hint=scrub(error.hint, token)) from None


def _convert(exc: Exception, repo_id: str, revision: str | None, writing: bool) -> HubError | None:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = repo_id if revision is None else f"{repo_id}@{revision}"
    if isinstance(exc, HFValidationError):
        return HubError(f"{where!r} is not a valid Hub repo id ({_server_says(exc)})", hint="use owner/name")
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or (
        constants.HF_HUB_OFFLINE and isinstance(exc, (FileNotFoundError, ConnectionError))
    ):
        if constants.HF_HUB_OFFLINE:
            return HubError(
                f"{where}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set",
                hint="download it once with network access, or unset HF_HUB_OFFLINE",
            )
        return HubError(
            f"{where}: cannot reach the Hub and the files are not in the local cache",
            hint=f"check the network and HF_ENDPOINT ({constants.ENDPOINT})",
        )
    status = _status(exc)
    if status == 401 and not isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"{where}: the Hub rejected the token (401: {_server_says(exc)})",
            hint="set a valid token with HF_TOKEN, --token or `hf auth login`",
        )
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{where}: gated repo; your account has not been granted access",
            hint="accept the model's terms on its Hub page, then use a token of that account",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"{where}: repository not found on the Hub (and no local folder of that name exists)",
            hint="check the id; a private repo needs a token (HF_TOKEN, --token or `hf auth login`)",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{where}: revision {revision or 'main'!r} not found", hint="check the branch, tag or commit")
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"{where}: a file is missing on the Hub ({_server_says(exc)})")
    if status == 403:
        action = "write to" if writing else "read"
        return HubError(
            f"{where}: your token may not {action} this repo (403: {_server_says(exc)})",
            hint="use a token with write access to the namespace" if writing else "check the token's permissions",
        )
    if isinstance(exc, HfHubHTTPError):
        code = f"{status}: " if status else ""
        return HubError(f"{where}: Hub request failed ({code}{_server_says(exc)})")
    if _is_timeout(exc):
        return HubError(
            f"{where}: the Hub at {constants.ENDPOINT} did not answer within {hub_timeout():g} s ({type(exc).__name__})",
            hint="check the network and HF_ENDPOINT; on a slow link raise LAZYMERGE_HUB_TIMEOUT (seconds)",
        )
    if _is_network_error(exc):
        return HubError(
            f"{where}: cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}: {_server_says(exc)})",
            hint="check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache",
        )
    return None


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import httpx2
    except ImportError:  # pragma: no cover - older huggingface_hub uses requests/httpx
        return False
    return isinstance(exc, httpx2.TransportError)


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    try:
        import httpx2
    except ImportError:  # pragma: no cover - older huggingface_hub uses requests/httpx
        return False
    return isinstance(exc, httpx2.TimeoutException)
