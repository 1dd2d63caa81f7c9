"""Run folders: one place for how a training run owns its folder and its checkpoints.

- A folder holds one run. Training into a folder that already holds one is refused unless the run
  is resumed (`resume=True`, the CLI's --resume) or replaced (`overwrite=True`, --overwrite).
- A resumed run must be the same run: every setting that shapes the trajectory has to match the
  checkpoint's; a longer `iterations` or another `time_budget` are the allowed changes (where files
  are written, how often it logs or checkpoints, the meta-test size and the device may change too).
- While a run trains it holds an exclusive lock on the folder (`.lock`, with its pid), so a second
  training into the same folder stops at once with a message instead of corrupting it.
- Checkpoints are written atomically (unique temporary name, fsync, rename; the previous one kept
  as <name>.prev) and carry a SHA-256 of their payload, verified on load; they load with
  weights_only=True (no code runs from a checkpoint file).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "gemext-checkpoint"
CHECKPOINT_VERSION = 3  # 3: one loop for every family (rng["family"], RL learners in the common form)
RUN_FILES = ("config.json", "checkpoint.pt", "checkpoint.pt.prev", "log.csv", "metrics.json")
# settings a resumed run may change: they do not alter the meta-training trajectory
RESUME_MAY_CHANGE = frozenset({"iterations", "out", "log_every", "checkpoint_every", "eval_tasks", "eval_steps",
                               "device", "data_root", "max_bad_steps", "time_budget",
                               "eval_split"})


@contextlib.contextmanager
def best_effort(what: str):
    """For the outputs of a meta-test (metrics.json, plots): a folder that cannot be written (read-only,
    full) costs a warning, never the results just computed."""
    try:
        yield
    except OSError as exc:
        warnings.warn(f"could not write {what}: {exc.strerror or exc}; the results are returned (and printed "
                      "by `gemext eval`) all the same", RuntimeWarning, stacklevel=3)


def unique_tmp(path: Path) -> Path:
    """A temporary name beside `path` that no other process uses."""
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Checkpoint `obj` to `path`: payload serialised, hashed, wrapped with its SHA-256, written
    to a unique temporary file, fsynced, then renamed over `path` (the old file becomes .prev)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    envelope = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    tmp = unique_tmp(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(envelope, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint file, verified; ValueError names what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        env = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding objects that are not plain data
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(env, dict) or env.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a gemext checkpoint")
    if env.get("version") != CHECKPOINT_VERSION:
        v = env.get("version")
        older = isinstance(v, int) and v < CHECKPOINT_VERSION
        raise ValueError(f"checkpoint {path} has format version {v}, this gemext reads version {CHECKPOINT_VERSION}"
                         + ("; it was written by an earlier gemext: evaluate it with that version or train the run "
                            "again" if older else "; it was written by a newer gemext"))
    payload = env.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != env.get("sha256"):
        raise ValueError(f"checkpoint {path} is damaged: its content does not match its SHA-256")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} holds data this gemext cannot read ({type(exc).__name__})") from exc


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint's config and a resumed run's, as 'name: old -> new'
    (those in RESUME_MAY_CHANGE excepted)."""
    keys = sorted((set(saved) | set(current)) - RESUME_MAY_CHANGE)
    changes = []
    for k in keys:
        old, new = saved.get(k), current.get(k)
        if isinstance(old, dict) and isinstance(new, dict):  # name the entries that differ (algo_options)
            changes += [f"{k}.{n}: {old.get(n)!r} -> {new.get(n)!r}" for n in sorted(set(old) | set(new))
                        if old.get(n) != new.get(n)]
        elif old != new:
            changes.append(f"{k}: {old!r} -> {new!r}")
    return changes


class RunFolderBusy(OSError):
    """Another process is training into the run folder."""


class RunLock:
    """Exclusive advisory lock on a run folder for the life of a training (fcntl.flock on
    FOLDER/.lock, released when the process exits, even on a crash)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"run folder {self.path.parent} is in use by another training (pid {holder}); "
                                   "wait for it to finish or choose another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def open_folder(folder: Path, resume: bool, overwrite: bool, outputs: tuple[str, ...] = ()) -> RunLock:
    """Create the folder, check it is writable, lock it, and check that it may receive this run:
    one that already holds a run is refused unless resuming (which needs its checkpoint) or
    overwriting (which then sets the previous run's files, and its meta-test `outputs`, aside:
    `settle_replaced`). Returns the held lock."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues the run in the folder, "
                         "overwrite replaces it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = unique_tmp(folder / ".write-test")
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"cannot write into the output folder {folder}: {exc.strerror or exc}") from exc
    lock = RunLock(folder).acquire()
    try:
        present = [f for f in RUN_FILES if (folder / f).exists()]
        if resume:
            if not (folder / "checkpoint.pt").exists():
                raise FileNotFoundError(f"cannot resume: no checkpoint at {folder / 'checkpoint.pt'}")
        elif present and not overwrite:
            raise FileExistsError(f"run folder {folder} already holds a run ({', '.join(present)}): continue it "
                                  "with --resume, choose another --out, or pass --overwrite to replace it")
        elif present:
            _set_aside(folder, present + [f for f in outputs if (folder / f).exists()])
    except BaseException:
        lock.release()
        raise
    return lock


REPLACED = ".replaced"  # the files of the run an --overwrite replaces, until the new one has trained


def _written(folder: Path) -> bool:
    """Whether the run in `folder` has trained (a log row or a checkpoint)."""
    return (folder / "checkpoint.pt").exists() or (folder / "log.csv").exists()


def _set_aside(folder: Path, names: list[str]) -> None:
    """Move the replaced run's files into folder/.replaced, so that a new run that fails before it
    trains gives them back (`settle_replaced`) instead of losing them."""
    aside = folder / REPLACED
    if aside.is_dir() and not _written(folder):
        # a replacement that never trained (killed outright): the run set aside is still the one to keep
        for name in names:
            (folder / name).unlink()
        return
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for name in names:
        os.replace(folder / name, aside / name)


def settle_replaced(folder: Path) -> None:
    """Once a new run in `folder` has stopped: if it trained, the replaced run's files go; if it
    failed before, its own config.json goes and the replaced run's files come back."""
    aside = folder / REPLACED
    if _written(folder):
        shutil.rmtree(aside, ignore_errors=True)
        return
    (folder / "config.json").unlink(missing_ok=True)  # a retry must not find a half-made run
    if aside.is_dir():
        for f in aside.iterdir():
            os.replace(f, folder / f.name)
        aside.rmdir()


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the gemext source when the package runs from a git checkout (an editable
    install), for config.json; None otherwise: no git, not a checkout, or a package installed into
    a folder that merely lies inside some other repository. Never fails. Looked up once per
    process: a process keeps running the code it loaded, whatever the checkout moves to."""
    package = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
                              capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.split("\n")
    if proc.returncode != 0 or len(lines) < 2:
        return None
    try:
        top = Path(lines[0]).resolve()
    except OSError:
        return None
    if top != package.parent:
        return None
    return lines[1].strip() or None


def run_task(folder: str | Path) -> str | None:
    """The task of the run in `folder` (its config.json), or None when there is none to read."""
    try:
        return json.loads((Path(folder) / "config.json").read_text())["task"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def missing_folders(folder: Path) -> list[Path]:
    """The folders that creating `folder` makes, deepest first (none when it exists)."""
    missing, f = [], Path(folder).absolute()
    while not f.exists():
        missing.append(f)
        f = f.parent
    return missing


def remove_unused(folders: list[Path]) -> None:
    """Remove `folders` (this run created them, deepest first) while they hold nothing but its lock
    file: a run refused before it wrote anything leaves no folder behind."""
    for f in folders:
        try:
            if {p.name for p in f.iterdir()} <= {".lock"}:
                (f / ".lock").unlink(missing_ok=True)
            f.rmdir()  # fails, and stops here, on a folder that holds anything else
        except OSError:
            return


class RunLog:
    """OUT/log.csv, one row per logged iteration, readable while the run goes on: each row is
    appended as it comes (the whole file is rewritten only when the columns change). Resuming from a
    checkpoint at iteration `resume_from` keeps the rows up to it and drops any logged after it."""

    def __init__(self, path: Path, resume_from: int | None = None, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.rows: list[dict] = []
        self._columns: list[str] | None = None
        if resume_from is not None and path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_from]
            self._rewrite()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        if self._columns is None or not set(row) <= set(self._columns):
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns, restval="").writerow(row)

    def _rewrite(self) -> None:
        if not self.enabled or not self.rows:
            return
        self._columns = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = unique_tmp(self.path)
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._columns, restval="")
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)
