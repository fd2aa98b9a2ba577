"""Clean exits on SIGINT / SIGTERM / SIGHUP for the command line, wherever the process is.

A Python signal handler runs only when the main thread executes Python bytecode, so Ctrl-C during a
multi-second XLA compile (or a model load in C) is seen late, and the `KeyboardInterrupt` it raises then
unwinds through JAX's C++ state while its threads still run: that is where segfaults and
`free(): invalid pointer` at exit came from. Here the signal also wakes a watcher thread (through
`signal.set_wakeup_fd`); whichever of the two acts first removes this process's in-flight temporary files
(`fileio.remove_inflight`), prints one line and ends the process with `os._exit(128 + signum)`, skipping an
interpreter teardown that would race the runtime's threads. Files already renamed into place are complete:
writes are atomic, so an interrupted run leaves whole files or none.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading

from e4t_jax import fileio

SIGNALS = tuple(s for s in (getattr(signal, 'SIGINT', None), getattr(signal, 'SIGTERM', None),
                            getattr(signal, 'SIGHUP', None)) if s is not None)
_exit_lock = threading.Lock()
_installed = False
_SOCKETS: list[socket.socket] = []


def _flush_streams(timeout_s: float = 1.0) -> None:
  """Flushes stdout/stderr from a helper thread, giving up after `timeout_s` (a stream's lock may be held by
  the thread being interrupted)."""
  def flush():
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # pylint: disable=broad-except
        pass
  thread = threading.Thread(target=flush, daemon=True)
  thread.start()
  thread.join(timeout_s)


def exit_now(signum: int) -> None:
  """Removes in-flight temporary files, prints one line and ends the process with 128 + signum."""
  with _exit_lock:  # the first caller exits; a second (handler and watcher racing) blocks until then
    fileio.remove_inflight(closing=True)
    _flush_streams()
    name = signal.Signals(signum).name if signum in iter(signal.Signals) else str(signum)
    os.write(2, f'e4t: interrupted by {name}; files written so far are complete, no partial file is left.\n'
             .encode())
    os._exit(128 + signum)


def _handler(signum, frame):  # pylint: disable=unused-argument
  exit_now(signum)


def _watch(sock: socket.socket) -> None:
  while True:
    try:
      data = sock.recv(1)
    except InterruptedError:
      continue
    except OSError:
      return
    if not data:
      return
    signum = data[0]
    if signum in SIGNALS:
      exit_now(signum)


def install() -> None:
  """Installs the handlers and the watcher thread (main thread only; idempotent)."""
  global _installed
  if _installed or threading.current_thread() is not threading.main_thread():
    return
  receive, send = socket.socketpair()
  send.setblocking(False)
  for signum in SIGNALS:
    signal.signal(signum, _handler)
  signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
  threading.Thread(target=_watch, args=(receive,), name='e4t-signal-watcher', daemon=True).start()
  _installed = True
  _SOCKETS.extend((receive, send))  # they live as long as the process
