"""Child processes that die with their parent.

``clawbus up`` and ``clawbus cluster`` start workers, gateways and
``nats-server`` processes. Each one must go away when the parent does, even if
the parent is killed with SIGKILL and never gets to stop them. On Linux that is
``prctl(PR_SET_PDEATHSIG, SIGTERM)`` in the child between fork and exec.

Two rules make that safe, and :func:`spawn` keeps both:

* the child may run nothing between fork and exec that could take a lock held
  by another thread of the parent (the parent has threads: output pumps,
  ``asyncio.to_thread``), so ``prctl`` is resolved in the parent and the preexec
  only calls it;
* the kernel sends the signal when the *thread* that forked the child exits,
  not the process, so every child is forked from one long-lived thread owned by
  this module, whatever thread calls :func:`spawn`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["die_with_parent_preexec", "spawn"]

_PR_SET_PDEATHSIG = 1


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the child gets SIGTERM when this process dies
    (Linux; None elsewhere). It also covers a parent that died before ``prctl``
    took effect."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sig = ctypes.c_ulong(int(signal.SIGTERM))
    zero = ctypes.c_ulong(0)

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, sig, zero, zero, zero)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _Forker:
    """The one thread every child is forked from (see the module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def run(self, fn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="clawbus-child-spawner")
            pool = self._pool
        return pool.submit(fn).result()


_forker = _Forker()


def spawn(args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(args, **popen)`` for a child that dies with this process.

    Pass ``process_group=0`` or ``start_new_session=True`` so that a terminal's
    Ctrl-C reaches only the parent, which then stops its children in order
    (subprocess sets those up in C, outside the preexec)."""
    preexec = die_with_parent_preexec()
    if preexec is None:
        return subprocess.Popen(list(args), **popen)
    return _forker.run(lambda: subprocess.Popen(
        list(args), preexec_fn=preexec, **popen))  # noqa: PLW1509 - only prctl, see above
