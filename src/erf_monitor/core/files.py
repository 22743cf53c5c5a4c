"""Files that are whole or absent, whatever happens to the disk while they are written.

A full disk (or a file-size limit) can stop any write part-way. Two habits keep every file
the library writes readable afterwards:

* :func:`replaced` writes a new file under a temporary name in the same folder and renames it
  over the destination only once it is complete; a failed write removes the temporary file.
  The rename replaces a symbolic link planted at the destination, never the file it points to.
* :func:`append_text` appends whole lines: a write that fails part-way is cut back, and a torn
  last line left by an earlier crash is cut off before anything is appended.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from os import PathLike
from pathlib import Path

__all__ = ["append_text", "replaced"]

_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


@contextlib.contextmanager
def replaced(path: str | PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed onto ``path`` when the
    ``with`` block ends normally, removed when it raises.

    The temporary file exists (empty) when the block starts, in ``path``'s folder (created if
    missing), named ``.<name>.<random>.tmp``; it is created with the usual permissions (the
    umask applies), exclusively, so a link planted under its name is never followed.

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "a.txt"
        >>> with replaced(out) as tmp:
        ...     _ = tmp.write_text("whole")
        >>> out.read_text(), sorted(p.name for p in out.parent.iterdir())
        ('whole', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_at(fd: int, size: int, offset: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)  # (os.pread is POSIX only)
    return os.read(fd, size)


def _whole_length(fd: int, size: int, chunk: int = 1 << 16) -> int:
    """The length of the file's content up to and including its last newline."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        block = _read_at(fd, end - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def append_text(path: str | PathLike[str], text: str, header: str = "") -> None:
    """Append ``text`` (whole lines, each ending in a newline) to ``path``, all or nothing.

    A last line without its newline (a write an earlier crash cut short) is removed first;
    ``header`` is written before ``text`` when the file is new or empty. A write that fails
    part-way (``OSError``: disk full, file too large) is cut back before the error is raised,
    so the next append starts on a fresh line.

    Examples:
        >>> import tempfile
        >>> log = Path(tempfile.mkdtemp()) / "log.csv"
        >>> _ = log.write_text("a,b\\n1,2\\n3,")  # the last row was torn
        >>> append_text(log, "5,6\\n", header="a,b\\n")
        >>> log.read_text()
        'a,b\\n1,2\\n5,6\\n'
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | _BINARY, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and _read_at(fd, 1, size - 1) != b"\n":
            size = _whole_length(fd, size)
            os.ftruncate(fd, size)
        data = memoryview(((header if size == 0 else "") + text).encode("utf-8"))
        try:
            while data:  # a write may stop short of the end (the limit): then the next raises
                data = data[os.write(fd, data) :]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
