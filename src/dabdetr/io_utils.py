"""Writing files safely: atomically, with ordinary permissions, never over a user's work.

- `atomic_write(path, data)`: bytes or text land in a temp file beside `path`, then replace it
  in one step (os.replace): a reader never sees half a file, and a failed write leaves the
  previous one intact. New files get the permissions any program's files get (0666 less the
  umask), whatever writes them.
- `atomic_path(path)`: the same for libraries that write by file name (torch.save,
  safetensors.save_file): write to the temp name it yields.
- `check_writable_target(path, force)`: refuses (OutputExistsError) to replace an existing
  file or a non-empty folder unless `force`.
OS failures (no permission, read-only, full disk) come out as `UnwritableError` naming the
path and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from dabdetr.errors import OutputExistsError, UnwritableError, UserError

__all__ = ["atomic_path", "atomic_write", "check_writable_target", "os_error", "unwritable"]

_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def unwritable(path: str | os.PathLike, err: OSError) -> UnwritableError:
    """An OSError met while writing `path`, as a UnwritableError that names path and fix."""
    if err.errno in _FULL:
        fix = "the disk is full; free some space or write elsewhere"
    elif err.errno in _DENIED:
        fix = "permission denied or read-only; choose a folder you can write to"
    else:
        fix = f"{err.strerror or err}; check the path or write elsewhere"
    return UnwritableError(f"cannot write {path}: {fix}")


def os_error(err: OSError) -> UserError:
    """Any OSError as a one-line UserError naming the file and the fix (UnwritableError for
    no permission, read-only or a full disk)."""
    name = err.filename if err.filename is not None else "a file"
    if err.errno in _FULL + _DENIED:
        return unwritable(name, err)
    if err.errno == errno.ENOENT:
        return UserError(f"{name}: no such file or directory; check the path")
    return UserError(f"{name}: {err.strerror or err}; check the path")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file name beside `path`; when the block ends without error, the temp file
    replaces `path` (the parent folder is created). On error the temp file is removed and
    `path` is untouched; OS errors become UnwritableError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise unwritable(path.parent, err) from None
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise unwritable(path, err) from None
    except RuntimeError as err:  # torch.save reports a failed open/write as RuntimeError
        raise UnwritableError(f"cannot write {path}: {err}; check space and permissions") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str: UTF-8) to `path` atomically, with the umask's permissions."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        # O_EXCL: never follow a planted link; mode 0o666 is reduced by the umask
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())


def check_writable_target(path: str | os.PathLike, force: bool, what: str = "") -> None:
    """Raise OutputExistsError if `path` is an existing file or a non-empty folder and not
    `force`. `what` describes it in the message (e.g. "a model folder")."""
    path = Path(path)
    if force or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    kind = what or ("a folder that is not empty" if path.is_dir() else "an existing file")
    raise OutputExistsError(f"{path} is {kind}; pass --force to replace it, or choose another "
                            "path")
