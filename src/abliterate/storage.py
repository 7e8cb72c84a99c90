"""Where a study lives: Optuna storages made safe for several workers, and what a study stores.

A study stores two kinds of things beside its trials. Facts a person reads are user attributes,
which `optuna studies` and optuna-dashboard show: the model, the eval prompt count, the original
model's refusals and the scoring pins (`study.pin_scoring`). Data only the tool reads, the refusal
direction basis (tens of kilobytes) and the warm-start plan, are system attributes, which those
listings leave out; `StudyData` names every key in one place.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import socket
import sqlite3
import time
import warnings
from pathlib import Path
from typing import IO

import optuna
import psutil
import torch
from optuna.storages._rdb import models as optuna_tables
from optuna.storages.journal import JournalFileOpenLock, JournalFileSymlinkLock
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from abliterate.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: Optuna's own journal lock
    fcntl = None

# Heartbeats let Optuna mark the trial of a killed worker as failed instead of running forever.
HEARTBEAT_SECONDS = 10
# Where a study lives in its output folder: an Optuna journal file, whose bookkeeping costs a trial
# about a quarter of SQLite's (benchmarks/bookkeeping.py); studies begun by earlier releases keep
# their SQLite file.
JOURNAL_FILE = "study.journal"
SQLITE_FILE = "study.db"


class StudyData:
    """Everything a study stores beside its trials, each under one key named here.

    User attributes (shown by `optuna studies` and optuna-dashboard): `model`, the source it
    belongs to; `eval_prompts` and `baseline_refusals`, the harmful eval prompt count and the
    original model's refusals among them (written last, once counted), and where a classifier judged
    too, `baseline_refusals_by_judge`, each judge's count; `scoring`, the options its
    scores depend on (`study.pin_scoring`); `n_trials`, the size last asked for. System attributes
    (left out of those listings): the refusal direction basis and the warm-start plan. Studies
    begun before this layout kept those two as user attributes: they are still read.
    """

    MODEL = "model"
    EVAL_PROMPTS = "eval_prompts"
    BASELINE_REFUSALS = "baseline_refusals"
    BASELINE_BY_JUDGE = "baseline_refusals_by_judge"
    SCORING = "scoring"
    N_TRIALS = "n_trials"
    DIRECTIONS = "abliterate:directions"
    WARM_STARTS = "abliterate:warm_starts"

    def __init__(self, study: optuna.Study):
        # Optuna's Study has no public system-attribute API; its storage has (BaseStorage).
        self._storage = study._storage
        self._study_id = study._study_id
        self._study = study

    def _get(self, key: str, legacy_user_attr: str):
        stored = self._storage.get_study_system_attrs(self._study_id)
        if key in stored:
            return stored[key]
        return self._study.user_attrs.get(legacy_user_attr)

    def _set(self, key: str, value) -> None:
        self._storage.set_study_system_attr(self._study_id, key, value)

    def _user(self, key: str):
        return self._study.user_attrs.get(key)

    @property
    def model(self) -> str | None:
        return self._user(self.MODEL)

    @model.setter
    def model(self, source: str) -> None:
        self._study.set_user_attr(self.MODEL, source)

    @property
    def eval_prompts(self) -> int | None:
        return self._user(self.EVAL_PROMPTS)

    @property
    def baseline_refusals(self) -> int | None:
        """The original model's refusals; None until counted."""
        return self._user(self.BASELINE_REFUSALS)

    @property
    def baseline_by_judge(self) -> dict[str, int]:
        """The original model's refusals by each judge (`RefusalCount.by_judge`); empty without a classifier."""
        return self._user(self.BASELINE_BY_JUDGE) or {}

    def record_baseline(
        self, eval_prompts: int, refusals: int, by_judge: dict[str, int] | None = None
    ) -> None:
        self._study.set_user_attr(self.EVAL_PROMPTS, eval_prompts)
        if by_judge:
            self._study.set_user_attr(self.BASELINE_BY_JUDGE, by_judge)
        self._study.set_user_attr(self.BASELINE_REFUSALS, refusals)  # last: its presence means both are there

    @property
    def scoring(self) -> dict[str, str]:
        return self._user(self.SCORING) or {}

    @scoring.setter
    def scoring(self, pins: dict[str, str]) -> None:
        self._study.set_user_attr(self.SCORING, pins)

    @property
    def n_trials(self) -> int | None:
        return self._user(self.N_TRIALS)

    @n_trials.setter
    def n_trials(self, count: int) -> None:
        self._study.set_user_attr(self.N_TRIALS, count)

    @property
    def has_directions(self) -> bool:
        """Whether the directions are stored, without decoding them (a waiting worker polls this, through
        `ready_for_trials`)."""
        return self._get(self.DIRECTIONS, "directions") is not None

    @property
    def ready_for_trials(self) -> bool:
        """Whether the directions are stored and the original model's refusals counted: what a worker
        that joins a study needs from the one that began it."""
        return self.has_directions and self.baseline_refusals is not None

    @property
    def directions(self) -> torch.Tensor | None:
        stored = self._get(self.DIRECTIONS, "directions")
        if stored is None:
            return None
        raw = bytearray(base64.b64decode(stored["float32_base64"]))
        return torch.frombuffer(raw, dtype=torch.float32).reshape(stored["shape"])

    @directions.setter
    def directions(self, basis: torch.Tensor) -> None:
        values = basis.detach().to(torch.float32).contiguous().cpu()
        encoded = base64.b64encode(values.numpy().tobytes()).decode("ascii")
        self._set(self.DIRECTIONS, {"shape": list(values.shape), "float32_base64": encoded})

    @property
    def warm_starts(self) -> list[dict] | None:
        return self._get(self.WARM_STARTS, "warm_starts")

    @warm_starts.setter
    def warm_starts(self, starts: list[dict]) -> None:
        self._set(self.WARM_STARTS, starts)


class HeartbeatStorage(optuna.storages.RDBStorage):
    """Optuna's SQL storage, which also fails trials whose worker died before their first heartbeat.

    Optuna creates a trial, then starts the thread that beats for it. A worker killed between the
    two leaves a running trial with no heartbeat at all, which Optuna never counts as stale: the
    other workers would wait for its slot forever. Such a trial is stale too once this process has
    seen it without a heartbeat for longer than the grace period (a live worker beats within moments
    of creating its trial). Timed by this process's own clock: a trial's start time is the local
    time of the host that made it, which may run in another time zone or drift.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Each running trial without a heartbeat: when this process first saw it so.
        self._silent_since: dict[int, float] = {}

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        # Optuna's grace period, as Optuna reads it.
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        running = {
            t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        }
        silent = running - self._beating(running)
        now = time.monotonic()
        self._silent_since = {trial_id: self._silent_since.get(trial_id, now) for trial_id in silent}
        return stale + sorted(trial_id for trial_id in silent if now - self._silent_since[trial_id] > grace)

    def _beating(self, trial_ids: set[int]) -> set[int]:
        """Which of `trial_ids` have a heartbeat."""
        if not trial_ids:
            return set()
        heartbeat = optuna_tables.TrialHeartbeatModel
        with self.scoped_session() as session:
            return {
                row.trial_id
                for row in session.query(heartbeat.trial_id).filter(heartbeat.trial_id.in_(trial_ids))
            }


def folder_storage_url(output: Path) -> str:
    """The storage URL of the study kept in an output folder: its SQLite file where an earlier
    release began it, else its journal file (which need not exist yet)."""
    if (output / SQLITE_FILE).is_file():
        return f"sqlite:///{(output / SQLITE_FILE).resolve()}"
    return f"journal:{(output / JOURNAL_FILE).resolve()}"


def folder_holds_study(output: Path) -> bool:
    return (output / SQLITE_FILE).is_file() or (output / JOURNAL_FILE).is_file()


class MissingStorage(UserError):
    """A study's file that is read, not made, is not there."""


def storage_file(url: str) -> Path | None:
    """The local file a journal or SQLite URL keeps its studies in; None for a database server."""
    if url.startswith("journal:"):
        return Path(url[len("journal:") :])
    if not url.startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except ArgumentError:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def open_storage(url: str, attempts: int = 5, existing: bool = False) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL; `journal:PATH` gives a file journal safe for several processes.

    `existing`: the storage is only read (a report, a trial to pick), so a file that is not there is
    an error, not made empty."""
    path = storage_file(url)
    if existing and path is not None and not path.is_file():
        raise MissingStorage(f"there is no {path}; give the --storage a study was run with")
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        assert path is not None  # every journal URL names its file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = journal_lock(path)
            drop_cut_last_line(path, lock)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
        except OSError as error:
            raise UserError(f"cannot open storage {url!r}: {error.strerror or error}") from None
    if url.startswith("sqlite"):
        write_ahead(url)
    for attempt in itertools.count(1):
        try:
            return HeartbeatStorage(
                url,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=3 * HEARTBEAT_SECONDS,
                # SQLite serializes writers with a lock: let several local workers wait for it.
                engine_kwargs={"connect_args": {"timeout": 60}}
                if url.startswith("sqlite")
                else {"pool_pre_ping": True},
            )
        except DBAPIError as error:
            # Workers starting together race to create the schema ("duplicate key", "relation already
            # exists"): the loser finds it made on retry. A lasting fault (no server) is reported.
            if attempt == attempts:
                raise UserError(f"cannot open storage {url!r}: {str(error).splitlines()[0]}") from None
            time.sleep(0.5 * attempt)
        except Exception as error:  # a malformed URL or a missing driver: retrying cannot help
            raise UserError(f"cannot open storage {url!r}: {str(error).splitlines()[0]}") from None


class KernelLock:
    """A journal's lock that the kernel gives back when its holder dies (`flock` on a lock file).

    Optuna's journal locks are files that a worker killed while appending leaves behind: the
    others then wait out a 30 s grace period. A lock held through `flock` goes with its process,
    like SQLite's. For one machine's local disks, as a journal study is. Whoever takes it first
    drops a line that a killed writer left cut off at the journal's end (`drop_cut_last_line`), so
    that every append starts on a whole line, also while other workers go on.
    """

    def __init__(self, path: Path, journal: Path | None = None):
        self.path = path
        self.journal = journal
        self._held: IO | None = None

    def acquire(self) -> bool:
        held = open(self.path, "a")  # noqa: SIM115 (held until release)
        fcntl.flock(held, fcntl.LOCK_EX)
        self._held = held
        if self.journal is not None and not _ends_whole(self.journal):
            _truncate_to_whole_lines(self.journal)
        return True

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()


def journal_lock(path: Path) -> KernelLock | JournalFileSymlinkLock:
    """The lock every writer of the journal at `path` takes: the kernel's where it has `flock`."""
    if fcntl is None:  # Windows
        return JournalFileSymlinkLock(str(path))
    return KernelLock(path.with_name(path.name + ".flock"), journal=path)


def drop_cut_last_line(path: Path, lock: KernelLock | JournalFileSymlinkLock | JournalFileOpenLock) -> None:
    """Remove a journal's last line if a write was cut off in it (a power loss, a killed process).

    Optuna's journal reads past a cut last line, but the next append would continue that line and
    leave an unreadable one in the middle, and every later open of the study would fail there. The
    cut write never completed, so its operation is dropped, as if never asked. Checked under the
    journal's lock (`lock`), which every writer holds while it appends, so no write in progress is
    taken for a cut one (a `KernelLock` checks on every acquisition, this is for the others).
    """
    if _ends_whole(path):  # the usual case, read without the lock: a reader need not write anything
        return
    lock.acquire()
    try:
        if not _ends_whole(path):  # else a writer was midway through its line
            _truncate_to_whole_lines(path)
    finally:
        lock.release()


def _truncate_to_whole_lines(path: Path) -> None:
    """Cut a journal back to the end of its last whole line (to nothing if it has none)."""
    with path.open("rb+") as journal:
        step = 1 << 16
        end = journal.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - step)
            journal.seek(start)
            found = journal.read(end - start).rfind(b"\n")
            if found >= 0:
                journal.truncate(start + found + 1)
                return
            end = start
        journal.truncate(0)


def _ends_whole(path: Path) -> bool:
    """Whether a journal is missing, empty or ends with a whole line."""
    if not path.is_file() or path.stat().st_size == 0:
        return True
    with path.open("rb") as journal:
        journal.seek(-1, os.SEEK_END)
        return journal.read(1) == b"\n"


def write_ahead(url: str) -> None:
    """Put an SQLite study file in write-ahead-log mode (the file keeps it).

    A commit then appends to the log instead of writing a rollback journal and syncing the
    database, and readers do not wait for a writer. Optuna commits every drawn parameter on its
    own: drawing a trial took 52 to 58 ms at 50 to 300 trials on this project's CPU, and takes 29 to
    47 in WAL mode (`benchmarks/sampler.py`), as durably (`synchronous` stays FULL). WAL needs every
    process on one machine, as SQLite studies already do. A database that cannot be opened here is
    left to the storage to report.
    """
    database = storage_file(url)
    if database is None:
        return
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(database, timeout=60)) as db:
        db.execute("PRAGMA journal_mode=WAL")


def process_identity(pid: int | None = None) -> str:
    """`host:pid:start`, naming one process for as long as the machine runs: a process id alone is
    reused, and a restarted container often gives the new run the very id its killed run had."""
    process = psutil.Process(pid)
    return f"{socket.gethostname()}:{process.pid}:{process.create_time():.2f}"


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark the running trials of dead workers as failed, so that their slots are run again.

    Storages with heartbeats find dead workers anywhere; for every storage, a trial started by a
    process of this machine that no longer runs is failed at once (the journal storage has no
    heartbeat, and a killed run would otherwise wait for its own orphan forever on restart).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # does nothing for storages without heartbeats
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _started_by_a_gone_process(str(trial.user_attrs.get("worker", ""))):
            with contextlib.suppress(RuntimeError, ValueError):  # another worker failed it first
                study.tell(trial.number, state=TrialState.FAIL)


def _started_by_a_gone_process(worker: str) -> bool:
    """Whether `worker` (a `process_identity`, or `host:pid` as earlier releases wrote it) is a
    process of this machine that no longer runs."""
    host, _, process = worker.partition(":")
    pid, _, start = process.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's: its heartbeat, if any, speaks for it
    try:
        running = process_identity(int(pid))
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # alive, but another user's
        return False
    return bool(start) and running != worker  # the same id, given to a process started since
