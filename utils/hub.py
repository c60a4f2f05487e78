"""Pretrained files from the Hugging Face Hub that fail fast: the local cache first, a download
only when the Hub answers, and one `HubUnavailable` (no retry loop, no hang) otherwise."""
from __future__ import annotations

import os
import socket
import urllib.parse


class HubUnavailable(OSError):
    """A hub file is neither cached nor downloadable; the message says which and why."""


def host_reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the host of ``url`` opens within ``timeout`` seconds."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    import huggingface_hub.constants as constants

    env = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
    return bool(constants.HF_HUB_OFFLINE) or env


def hub_file(repo_id: str, filename: str) -> str:
    """Local path of `repo_id/filename`: the hub cache, else a download (HubUnavailable when the
    file is not cached and the Hub is offline, unreachable or refuses)."""
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    offline = hub_offline()
    if offline or not host_reachable(huggingface_hub.constants.ENDPOINT):
        raise HubUnavailable(f"{repo_id}/{filename} is not in the local hub cache and the Hugging Face Hub is "
                             f"unreachable{' (HF_HUB_OFFLINE is set)' if offline else ''}")
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, etag_timeout=10)
    except Exception as exc:  # noqa: BLE001 - network and hub errors of every kind
        raise HubUnavailable(f"downloading {repo_id}/{filename} failed ({type(exc).__name__}: {exc})") from None
