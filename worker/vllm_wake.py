"""A direct wake-up between vLLM's engine processes: one pipe per reader instead of a zmq ping.

vLLM's shared-memory queue (`MessageQueue`, between the engine core and the model process) wakes a sleeping
reader with a zmq PUB/SUB ping, and that ping can be lost: the PUB socket queues one, and libzmq drops one
sent within ~1.2 ms of the last. A reader that read the first of two quick messages and fell asleep before
the second then sleeps until a recheck (worker/vllm_spin.py: 10 ms while busy). vLLM never meets this with
its 1 s busy-wait, but it made a short one risky and no busy-wait at all a stall on most steps. Each ping is
also three scheduling hops: the writer's send wakes zmq's I/O thread in its process, that one the I/O
thread in the reader's, and that one the reader; py-spy found the model process 5% of its time, and the
engine core's main thread 12% of it, inside the ping's `send` (BENCHMARKS.md, "No busy-wait").

Here the writer of a queue with local readers also makes one named pipe (FIFO) per local reader, and its
`notify` writes one byte to each: a reader asleep in `poll` on its pipe is woken by the kernel, one hop,
and a byte written while it was not asleep waits in the pipe, so no wake-up is lost, and the engine
processes can sleep as soon as they have nothing to read (INFERQ_ENGINE_SPIN_MS=0, the default). A reader
opens its pipe before it subscribes to the queue, and the writer removes the pipes once every reader has
subscribed (`wait_until_ready`): the open ends keep working and nothing is left on disk. vLLM's zmq sockets
stay as they are, for cancelling a read at shutdown. Where a pipe cannot be made the writer pings as vLLM
does, and its readers, finding no pipe, wait for the ping.

Installed by worker/vllm_spin.py's plugin, so only in vLLM started by an inferq engine; every process of
such an engine loads the plugin, so both ends of each queue agree.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from typing import Any

import zmq

log = logging.getLogger("vllm.inferq")
_SUFFIX = ".inferq-wake"


def install() -> None:
    """Patch vLLM's MessageQueue and SpinCondition (idempotent: vLLM may load a plugin more than once)."""
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue, SpinCondition

    queue: Any = MessageQueue
    spin: Any = SpinCondition
    if getattr(queue.__init__, "_inferq_wake", False):
        return
    init, from_handle, ready = queue.__init__, queue.create_from_handle, queue.wait_until_ready
    notify = spin.notify

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if self._spin_condition is not None:
            paths = [_pipe_path(self.handle.local_notify_addr, i) for i in range(self.n_local_reader)]
            try:
                self._spin_condition._inferq_pipes = _WriterPipes(paths)
            except OSError as exc:  # no pipes, so readers find none and wait for vLLM's ping, as it ships
                log.warning("vLLM's zmq ping left to wake readers: cannot make a pipe (%s)", exc)

    __init__._inferq_wake = True  # type: ignore[attr-defined]

    def create_from_handle(handle: Any, rank: int) -> Any:
        # Opened before vLLM's reader subscribes: the writer removes the pipes once all readers have.
        fd = None
        if rank in handle.local_reader_ranks and handle.local_notify_addr:
            path = _pipe_path(handle.local_notify_addr, handle.local_reader_ranks.index(rank))
            with contextlib.suppress(FileNotFoundError):  # the writer made none: it pings over zmq
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            self = from_handle(handle, rank)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            self._spin_condition._inferq_pipe = _ReaderPipe(fd, self._spin_condition.read_cancel_socket)
        return self

    @functools.wraps(ready)
    def wait_until_ready(self: Any) -> None:
        ready(self)
        pipes = getattr(self._spin_condition, "_inferq_pipes", None) if self._is_writer else None
        if pipes is not None:
            pipes.unlink()

    @functools.wraps(notify)
    def notify_pipes(self: Any) -> None:
        pipes = getattr(self, "_inferq_pipes", None)
        if pipes is None:
            notify(self)
        else:
            pipes.notify()

    queue.__init__ = __init__
    queue.create_from_handle = staticmethod(create_from_handle)
    queue.wait_until_ready = wait_until_ready
    spin.notify = notify_pipes


def reader_pipe(cond: Any) -> _ReaderPipe | None:
    """The pipe a reader's SpinCondition sleeps on instead of vLLM's ping (worker/vllm_spin.py), if any."""
    return getattr(cond, "_inferq_pipe", None)


def _pipe_path(notify_address: str, reader: int) -> str:
    # vLLM's notify address is an ipc:// path of its own (a fresh name in its run directory) per queue.
    return f"{notify_address.removeprefix('ipc://')}{_SUFFIX}{reader}"


class _WriterPipes:
    """The writer's ends: one pipe per local reader, opened read-write so a write never fails for want of a
    reader and never blocks (a full pipe already holds a wake-up)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.fds: list[int] = []
        try:
            for path in paths:
                os.mkfifo(path, 0o600)
                self.fds.append(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        except BaseException:
            self.unlink()
            _close(self.fds)
            raise
        weakref.finalize(self, _close, list(self.fds))
        weakref.finalize(self, _unlink, list(self.paths))

    def notify(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(BlockingIOError):
                os.write(fd, b"\0")

    def unlink(self) -> None:
        _unlink(self.paths)


class _ReaderPipe:
    """A reader's end: it sleeps in poll on the pipe and on vLLM's cancel socket (shutdown)."""

    def __init__(self, fd: int, cancel: zmq.Socket[Any]) -> None:
        self.fd = fd
        self.poller = zmq.Poller()
        self.poller.register(cancel, zmq.POLLIN)
        self.poller.register(fd, zmq.POLLIN)
        weakref.finalize(self, _close, [fd])

    def wait(self, timeout_ms: int | None) -> None:
        events = dict(self.poller.poll(timeout=timeout_ms))
        if self.fd in events:
            # Every byte stands for a message already in shared memory (the writer writes it first), and the
            # caller looks there next: drop them all.
            with contextlib.suppress(BlockingIOError):
                while os.read(self.fd, 4096):
                    pass


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _unlink(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
