"""Files autocomp keeps between runs (trained teachers, sensitivity maps): written atomically (a temporary file,
then a rename) with a SHA-256 digest beside them (``NAME.sha256``), and read back only when the digest holds. A
truncated or corrupt file is named in a one-line warning, removed, and rebuilt by its caller."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def sha256(payload: bytes) -> str:
    """The SHA-256 of ``payload``, in hex: what a cache file's digest and an exported artifact's provenance record."""
    return hashlib.sha256(payload).hexdigest()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file beside it and a rename."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)  # a reader sees the old file or the whole new one, never half of it


def write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path``, then its digest beside it, each through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, payload)
    atomic_write(_digest_path(path), sha256(payload).encode())


def read(path: Path, parse: Callable[[bytes], T], what: str) -> T | None:
    """``parse`` of the file at ``path`` if it is whole (its digest holds, and it parses); else None, after a
    warning naming the file, with the file removed so that the caller rebuilds it. A file written before digests
    were kept is taken if it parses, and its digest is written then."""
    if not path.exists():
        return None
    payload = path.read_bytes()
    digest = sha256(payload)
    recorded = _digest_path(path).read_text().strip() if _digest_path(path).exists() else None
    why = None
    if recorded is not None and recorded != digest:
        why = f"its SHA-256 is not the one recorded in {_digest_path(path).name} (truncated or changed)"
    else:
        try:
            value = parse(payload)
        except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt, its reason said
            why = f"it cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
        else:
            if recorded is None:  # an older cache's file, whole: its digest is kept from now on
                atomic_write(_digest_path(path), digest.encode())
            return value
    print(f"autocomp: warning: the cached {what} {path} is corrupt: {why}; rebuilding it.", file=sys.stderr)
    path.unlink(missing_ok=True)
    _digest_path(path).unlink(missing_ok=True)
    return None
