"""The halt state as ``custody halt status`` shows it, and what publishing it does after the
store was read: the halt file written (never over a newer one) and the hook run.

Shared by the full read (custody.control.halt, through the ORM) and the light one
(custody.control.halt_light, a DB-API cursor): standard library only, like halt_file.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custody.clock import iso, now
from custody.config import Settings
from custody.control import halt_file

HOOK_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR")
"""The only variables of custody's environment a halt hook inherits (and ``LC_*``): never a
passphrase, PIN, node or mail credential, nor the database URL."""


@dataclass
class HaltState:
    """What ``custody halt status`` shows and the halt file mirrors."""

    halted: bool
    halts: list[dict[str, Any]]
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    seq: int | None = None
    """The audit log entry this state reflects (None: the store was not read)."""
    recorded: frozenset[str] = frozenset()
    """Journal ids the store has recorded."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    """Halts waiting in the halt file for the store."""
    file: dict[str, Any] | None = None
    """The halt file as written (None: not written)."""
    unknown: bool = False
    """The store was locked elsewhere (StoreBusy): the state is unknown, not a halt. ``halted``
    stays True for every caller in the library (fail closed); ``halt status`` says "unknown"
    and leaves the halt file alone, whose lease then decides for the engine."""

    def to_dict(self) -> dict[str, Any]:
        if self.file is not None:
            return dict(self.file)
        return self.document(None if self.unknown else self.halted, iso(now()), None)

    def document(self, halted: bool | None, updated_at: str | None, valid_until: str | None) -> dict[str, Any]:
        """The state in the halt file's format, with the caller's ``halted``, time and lease."""
        doc: dict[str, Any] = {
            "format": halt_file.FORMAT,
            "version": halt_file.VERSION,
            "halted": halted,
            "seq": self.seq,
            "updated_at": updated_at,
            "valid_until": valid_until,
            "halts": self.halts,
        }
        if self.pending:
            doc["pending"] = self.pending
        if self.error:
            doc["error"] = self.error
        return doc


def with_waiting(state: HaltState, path: Path) -> HaltState:
    """``state`` (read from the store) with the halts waiting in the halt file at ``path`` that
    the store has not recorded (by journal id): halted while any waits. A store that refuses to
    record a halt (down, full, or made to refuse by SQL) must not make a reader of the store
    alone answer "not halted" while the halt file says halted. ``state`` is not changed."""
    waiting = [p for p in halt_file.pending(path) if p["id"] not in state.recorded]
    return dataclasses.replace(state, halted=True, pending=waiting) if waiting else state


def write_out(
    settings: Settings,
    state: HaltState,
    read_again: Callable[[], HaltState],
    *,
    hook: bool | None,
    lease: float | None,
) -> HaltState:
    """Write ``state`` (read from the store) to the halt file, never over a newer one: when the
    file is newer, the store is read again (``read_again``) and that is written, or a file
    that ran ahead of the store's head is replaced. Then the hook: always (``hook=True``), on a
    change of the file's ``halted`` (None), or never (False). Returns the state as written;
    failures come back as warnings."""
    if state.unknown:  # nothing known to write: the file's lease runs out on its own
        return state
    lease = settings.halt_lease if lease is None else lease
    force_over: int | None = None
    for _ in range(5):
        want = halt_file.Doc(state.halted, state.seq, state.halts, recorded=state.recorded, error=state.error)
        written = halt_file.write(settings.halt_file, want, lease=lease, force_over=force_over)
        if written.newer is None:
            break
        again = read_again()
        again.warnings[:0] = state.warnings
        state = again
        if state.seq is not None and state.seq < written.newer:
            state.warnings.append(
                f"the halt file {settings.halt_file} claimed audit entry {written.newer}, beyond the log's head "
                f"{state.seq}: replaced"
            )
            force_over = written.newer
    state.warnings.extend(written.warnings)
    if written.written and written.doc is not None:
        state.file = written.doc
        state.halted = bool(written.doc["halted"])
        state.pending = list(written.doc.get("pending", []))
    elif written.error:
        removed = " (removed instead: the engine reads that as halted)" if written.removed else ""
        state.warnings.append(written.error + removed)
    changed = written.before is None or written.before != state.halted
    if hook or (hook is None and (changed or not written.written)):
        problem = run_hook(settings, state.halted, state.seq)
        if problem:
            state.warnings.append(problem)
    return state


def hook_environment(settings: Settings, halted: bool, seq: int | None) -> dict[str, str]:
    """The hook's environment: an allow-list of custody's, and the halt state."""
    env = {k: v for k, v in settings.hook_env.items() if k in HOOK_ENV or k.startswith("LC_")}
    env["CUSTODY_HALTED"] = "1" if halted else "0"
    env["CUSTODY_HALT_FILE"] = str(settings.halt_file)
    env["CUSTODY_HALT_SEQ"] = "" if seq is None else str(seq)
    return env


def run_hook(settings: Settings, halted: bool, seq: int | None) -> str | None:
    """Run CUSTODY_HALT_HOOK (at most 30 s); returns what went wrong, else None."""
    if not settings.halt_hook:
        return None
    try:
        result = subprocess.run(
            shlex.split(settings.halt_hook),
            env=hook_environment(settings, halted, seq),
            timeout=30,
            capture_output=True,
            check=False,
        )
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return f"halt hook failed: {exc}"
    return f"halt hook exited with {result.returncode}" if result.returncode != 0 else None
