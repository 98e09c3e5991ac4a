"""Run ``custody`` on a pseudo-terminal of a given size and read what the screen got."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def run_on_pty(
    args: list[str], env: dict[str, str], columns: int, rows: int = 40, timeout: float = 120, inherit: bool = True
) -> str:
    """``custody ARGS`` with stdin, stdout and stderr on one pseudo-terminal of ``columns`` x
    ``rows`` (COLUMNS and LINES unset: the program asks the terminal); the raw screen bytes.
    ``env`` adds to this process's environment, or is the whole of it without ``inherit``."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    base = {**os.environ, **env} if inherit else dict(env)
    child_env = {k: v for k, v in base.items() if k not in ("COLUMNS", "LINES")}
    child_env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        [sys.executable, "-m", "custody_cli", *args], stdin=slave, stdout=slave, stderr=slave, env=child_env
    )
    os.close(slave)
    try:
        screen = read_screen(master, proc, timeout)
    finally:
        os.close(master)
        proc.wait(timeout=30)
    return screen.decode("utf-8", "replace")


def read_screen(
    master: int, proc: subprocess.Popen[bytes], timeout: float, prompt: bytes = b"", answer: bytes = b""
) -> bytes:
    """What ``proc`` wrote to the terminal whose ``master`` end this is, until it closed it or
    exited; ``answer`` typed once ``prompt`` shows. Kills ``proc`` and raises AssertionError when
    it is not done within ``timeout`` seconds."""
    screen = b""
    answered = not prompt
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
            if not answered and prompt in screen:
                os.write(master, answer)
                answered = True
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
        raise AssertionError(f"custody did not finish on the terminal: {screen[-2000:]!r}")
    return screen


def plain(screen: str) -> str:
    """The screen's text without colour, cursor and carriage-return sequences."""
    return ANSI.sub("", screen)
