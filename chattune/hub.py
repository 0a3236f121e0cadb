"""A model named by hub id when the hub cannot be reached: decided in seconds, not after a minute of retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_TRUE = ("1", "ON", "YES", "TRUE")


def _offline() -> bool:
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _go_offline() -> None:
    """Offline mode from now on in this process (huggingface_hub reads the variable once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub endpoint (HF_ENDPOINT, default huggingface.co) cannot be reached, or None when it can."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or e})"
    return None


def model_source_problem(name: str, flag: str = "--model_name_or_path", cache_dir: str | None = None) -> str | None:
    """None when `name` is a local directory, offline mode is on, or the hub answers. When the hub cannot be reached,
    a model already in the local hub cache is used offline (with a note); otherwise the problem and its fix."""
    if not name or os.path.isdir(name) or _offline():
        return None
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        return f"{flag} {name}: no such directory (a local model is a directory with config.json)"
    why = hub_unreachable()
    if why is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    from chattune.cli import log

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache_dir), str)
    except ValueError:  # not a valid repo id ("qwen:7b", "my model"): nothing of that name can be cached
        cached = False
    if cached:
        log(f"note: the Hugging Face hub is unreachable ({why}); using the copy of {name} in the local hub cache")
        _go_offline()
        return None
    return (f"{flag} {name}: not a local directory, and the Hugging Face hub {why}. Pass the path of a local model "
            "directory (one with config.json), run where the hub is reachable (HF_ENDPOINT for a mirror), or "
            "download it first (huggingface-cli download NAME) and set HF_HUB_OFFLINE=1")
