"""``custody serve --workers N``: N processes answering on one listening socket.

One Python process runs one request's Python at a time; several use every core. The parent
binds the socket, then forks the workers; each builds its own application (its own
connections, its own memory of read nonces, its own halt reader) and accepts on the shared
socket, where the kernel hands each connection to one of them. That is safe for the same
reason as several instances behind a load balancer: the store serializes what must be
(issuance allocates each index under the store's lock, a state-changing request's nonce is
a row of the store that only one process can insert, every state change takes the halt
guard in its own transaction).

The parent serves nothing: SIGTERM or SIGINT it passes on to every worker, which finishes
what it is answering; a worker that exits on its own stops the others, and :func:`serve`
raises. Forking needs what a worker holds to survive a fork: a key on a PKCS#11 token (its
library is initialised once per process) or the embedded chain (one process's) are refused.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from types import FrameType

from custody.config import Settings
from custody.errors import CustodyError, InputError
from custody.identity.employee_keys import EmployeeSigner, FileSigner
from custody.store.db import Database

MAX_WORKERS = 32


class WorkerDied(CustodyError):
    """A worker of ``custody serve --workers`` exited on its own; the others were stopped."""


def check_forkable(workers: int, settings: Settings, key: EmployeeSigner) -> None:
    """Raise InputError unless ``workers`` processes can each hold the service's key and chain."""
    if workers == 1:
        return
    if not isinstance(key, FileSigner):
        raise InputError("--workers above 1 needs the service's key in a key file: a token's session is one process's")
    if settings.chain == "embedded":
        raise InputError("--workers above 1 needs a node (CUSTODY_NODE_URL): the embedded chain is one process's")


def serve(
    make_app: Callable[[], object],
    db: Database,
    *,
    host: str,
    port: int,
    workers: int,
    log_level: str,
) -> None:
    """Serve ``make_app()`` on host:port in ``workers`` processes until SIGTERM or SIGINT.

    Raises InputError (the address cannot be bound), WorkerDied.
    """
    import uvicorn

    if workers == 1:
        uvicorn.run(make_app(), host=host, port=port, log_level=log_level, access_log=False)  # type: ignore[arg-type]
        return
    try:
        sock = uvicorn.Config(app=None, host=host, port=port, log_level=log_level).bind_socket()  # type: ignore[arg-type]
    except SystemExit:  # uvicorn exits when the address is taken (it logs why)
        raise InputError(f"cannot listen on {host}:{port}") from None
    db.dispose()  # no connection of this process crosses the fork
    supervisor = _Supervisor()
    try:
        for _ in range(workers):
            pid = os.fork()
            if pid == 0:  # the worker
                _worker(make_app, sock, log_level)
            supervisor.children.add(pid)
            if supervisor.stopping:  # a signal came while forking: the new one is stopped too
                supervisor.stop(signal.SIGTERM, None)
        supervisor.wait()
    finally:
        sock.close()
        supervisor.restore()


def _worker(make_app: Callable[[], object], sock: socket.socket, log_level: str) -> None:
    """One worker: its own application on the shared socket; never returns into the parent's code."""
    import uvicorn

    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)  # uvicorn installs its own
        server = uvicorn.Server(uvicorn.Config(make_app(), log_level=log_level, access_log=False))  # type: ignore[arg-type]
        server.run(sockets=[sock])
        code = 0
    finally:
        os._exit(code)


class _Supervisor:
    """The parent: passes SIGTERM and SIGINT on to every worker, waits for each, and stops all
    when one exits unasked. Its handlers are in place before the first fork."""

    def __init__(self) -> None:
        self.children: set[int] = set()
        self.stopping = False
        self._previous = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # exited already; wait() collects it

    def wait(self) -> None:
        """Until every worker exited. Raises WorkerDied when one exited unasked."""
        died: list[str] = []
        while self.children:
            pid, status = os.wait()
            self.children.discard(pid)
            if not self.stopping:
                died.append(f"worker {pid} exited with status {os.waitstatus_to_exitcode(status)}")
                self.stop(signal.SIGTERM, None)
        if died:
            raise WorkerDied(f"{died[0]}: the other workers were stopped")

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        for pid in self.children:  # only after an error in this process: wait() collects each
            os.kill(pid, signal.SIGKILL)
