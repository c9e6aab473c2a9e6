"""Wake the folder source when a watched directory changes (Linux inotify, through ctypes).

Only a wake-up: the folder source still decides what changed by its own stat of every file, so a
missed or merged event costs nothing but the wait for its next poll. Directories are watched
(not files: an editor that saves by rename replaces the file), each one found under the given
paths when the watch starts and whenever the source lists them again (:meth:`Watcher.watch`).
Where inotify is missing (not Linux, or the per-user watch limit reached), :func:`open_watcher`
returns ``None`` and the source polls as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# <sys/inotify.h>
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
#: not IN_MODIFY: a file half-written is not worth a read (its IN_CLOSE_WRITE follows)
_MASK = (_IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
         | _IN_DELETE_SELF | _IN_MOVE_SELF)
#: read at most this much per wake-up: events are only a signal, the rest is read next time
_READ_BYTES = 64 * 1024
_EVENT = struct.Struct("iIII")


class Watcher:
    """An inotify descriptor watching directories; ``on_event`` is called (on the event loop,
    through ``loop.add_reader``) once per batch of events."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self.fd = fd
        self._libc = libc
        self._watched: dict[Path, int] = {}

    def watch(self, directories: Iterable[Path]) -> None:
        """Watch each of ``directories`` not watched yet (those that vanished are dropped by
        the kernel; adding one again is harmless)."""
        for directory in directories:
            if directory in self._watched:
                continue
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), _MASK)
            if wd < 0:
                error = ctypes.get_errno()
                log.warning("not watching %s for changes (%s): polling it", directory,
                            os.strerror(error))
                continue
            self._watched[directory] = wd

    def drain(self) -> bool:
        """Read the pending events; whether there were any."""
        try:
            data = os.read(self.fd, _READ_BYTES)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("inotify read failed (%s): polling only", exc)
            return False
        self._forget_removed(data)
        return bool(data)

    def _forget_removed(self, data: bytes) -> None:
        """Directories removed or moved away lose their watch: forget them, so a directory of
        the same name made later is watched again."""
        offset = 0
        gone: set[int] = set()
        while offset + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF):
                gone.add(wd)
            offset += _EVENT.size + length
        if gone:
            self._watched = {d: w for d, w in self._watched.items() if w not in gone}

    def close(self) -> None:
        os.close(self.fd)


def directories(paths: Iterable[Path]) -> list[Path]:
    """The directories to watch for ``paths``: a directory and those under it; a file's parent."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.append(path)
            out += [p for p in path.rglob("*") if p.is_dir()]
        else:
            out.append(path.parent)
    return out


def open_watcher(opener: Callable[[], int] | None = None) -> Watcher | None:
    """A :class:`Watcher`, or ``None`` where inotify is not available."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        init = libc.inotify_init1
    except (OSError, AttributeError):
        return None
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    fd = opener() if opener is not None else init(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        log.warning("inotify unavailable (%s): polling", os.strerror(ctypes.get_errno()))
        return None
    return Watcher(fd, libc)
