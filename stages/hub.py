"""Model hub access that fails fast when there is no network, instead of minutes of retries."""

from __future__ import annotations

import os
import socket


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_available(repo: str, filename: str) -> bool:
    """Whether a hub file is in the local cache or could be downloaded (checked without downloading)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    return isinstance(cached, str) or hub_reachable()


def hub_file(repo: str, filename: str) -> str:
    """Local path of a hub file: the cache first, then a download when the hub is reachable."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:
        if not hub_reachable():
            raise FileNotFoundError(f"{repo}/{filename} is not cached and the hub is unreachable") from None
        return hf_hub_download(repo, filename)
