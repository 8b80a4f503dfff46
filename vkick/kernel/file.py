"""fs/file.c, fs/file_table.c, include/linux/file.h: a file's reference count, and what the
last reference does.

A ``struct file`` is held by the process's fd table (one reference, from open until
``close``) and by every kernel user that looked it up (``fget``/``fdget`` … ``fput``).
When the count drops to zero the file is released: ``f_op->release`` runs (for an eventfd:
``eventfd_release``, which wakes its queue with EPOLLHUP).  So a ``close(fd)`` by one thread
releases the file at once only if nobody else holds it; a thread inside an ioctl that did
``fdget`` keeps it alive until its ``fdput`` (research/bugs.md #12b).

vkick has no fd numbers: each file stands for the one fd the VMM holds on it
(``fd_installed`` says whether that fd is still open).

Covered: ``fget``, ``__fdget`` (as ``fdget``), ``fdput``, ``fput`` (with ``__fput``),
``close_fd``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, eq=False)
class File:
    """include/linux/fs.h: struct file

    ``f_count`` counts the references (the fd table's while ``fd_installed``, and one per
    ``fget``); ``private_data`` is the object behind the file (the eventfd context);
    ``release`` is ``f_op->release``, called with ``private_data`` when the last reference
    goes.  ``name`` labels it.
    """

    name: str
    private_data: Any
    release: Callable[[Any], None]
    f_count: int = 1
    fd_installed: bool = True


def fget(file: File) -> File | None:
    """fs/file.c: fget  [process]

    Look the fd up and take a reference; None (the caller's -EBADF) once it was closed.
    Differs from the kernel: the file is passed instead of the fd number.
    """
    if not file.fd_installed:
        return None
    file.f_count += 1
    return file


def fdget(file: File) -> File | None:
    """fs/file.c: __fdget (fdget)  [process]

    ``fget`` for the span of a syscall.  The kernel skips the reference only when the fd
    table is not shared (a single-threaded process); a VMM is multi-threaded, so it takes
    one, and a concurrent ``close`` cannot release the file under the caller.
    """
    return fget(file)


def fdput(file: File) -> None:
    """include/linux/file.h: fdput  [process]

    Drop ``fdget``'s reference (``fput``).
    """
    fput(file)


def fput(file: File) -> None:
    """fs/file_table.c: fput  [any context]

    Drop a reference; the last one releases the file (``__fput`` → ``f_op->release``).
    Differs from the kernel: the release runs at once; the kernel defers it to task work
    that runs before the calling thread returns to user space, which on the paths modelled
    here is the same moment.
    """
    if file.f_count <= 0:
        raise RuntimeError(f"fput({file.name}): no reference left (a double fput)")
    file.f_count -= 1
    if file.f_count == 0:
        file.release(file.private_data)  # __fput: f_op->release(inode, file)


def close_fd(file: File) -> int:
    """fs/file.c: close_fd (the close(2) syscall)  [process]

    Remove the fd from the table and drop the table's reference (``filp_close`` →
    ``fput``): the file is released now unless a kernel user still holds it.  -EBADF if the
    fd is already closed.
    """
    if not file.fd_installed:
        return -errno.EBADF
    file.fd_installed = False
    fput(file)
    return 0
