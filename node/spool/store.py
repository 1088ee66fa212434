"""The spool: received instances as files, written tmp → fsync → rename → fsync(dir).

File names are derived from a hash of the SOP Instance UID, never from the UID itself, so a peer
cannot steer a path (``../`` or absurd lengths in a UID are harmless here).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, chunks: list[bytes] | bytes, *, tmp_dir: Path) -> int:
    """Write ``chunks`` to ``path`` so that it is complete and on disk when this returns.

    The data goes to a unique temporary file in ``tmp_dir`` (same file system), is fsynced, renamed
    over ``path`` and the directory entry is fsynced. A crash leaves either no file or the whole file
    at ``path`` (plus, at worst, a stale ``*.part`` in ``tmp_dir`` that :func:`clean_tmp` removes).
    Returns the number of bytes written.
    """
    parts = [chunks] if isinstance(chunks, bytes) else chunks
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    size = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                size += n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return size


class Spool:
    """Received instances on disk, addressed by SOP Instance UID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.instances = root / "instances"
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        for n in range(256):  # created once, so the receive path never has to mkdir
            (self.instances / f"{n:02x}").mkdir(parents=True, exist_ok=True)

    def path_for(self, sop_instance_uid: str) -> Path:
        digest = hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()
        return self.instances / digest[:2] / f"{digest[2:34]}.dcm"

    def store(self, sop_instance_uid: str, chunks: list[bytes]) -> tuple[Path, int]:
        """Durably store one instance's encoded bytes; return its path and size."""
        path = self.path_for(sop_instance_uid)
        size = durable_write(path, chunks, tmp_dir=self.tmp)
        return path, size

    def all_files(self) -> list[Path]:
        """Every instance file in the spool (for reconciling the index after a crash)."""
        return [p for d in sorted(self.instances.iterdir()) if d.is_dir() for p in d.glob("*.dcm")]

    def clean_tmp(self) -> int:
        """Remove partial files left by a crash; return how many were removed."""
        removed = 0
        for part in self.tmp.glob("*.part"):
            part.unlink(missing_ok=True)
            removed += 1
        return removed
