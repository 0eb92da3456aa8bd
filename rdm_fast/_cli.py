"""What the command-line entry points share: one-line errors instead of tracebacks, logging, precision."""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import SOURCE_CHECKOUT
from . import checkpoint as ckpt
from ._files import LOCK_FILE, make_dirs, naming_failed_writes
from .checkpoint import CheckpointError
from .config import ConfigError
from .ops import FastPathUnavailable, get_mode
from .retrieval.build import PILLOW_MAX_PIXELS, set_max_image_pixels

log = logging.getLogger("rdm_fast")
_HELD_LOCKS: set[OutDirLock] = set()  # closed in forked children (DataLoader workers), which would share the lock


class CLIError(Exception):
    """A mistake in the command line or its input files; printed as one line, exit status 2."""


def one_process(command: str) -> None:
    """Refuse to run ``command`` under torchrun with more than one process: it is not split over processes, so each
    would do all of the work and write the same outputs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError(f"{command} runs in one process (under torchrun each process would do all of it, writing "
                       "the same outputs): run it with python, not torchrun")


class _TqdmHandler(logging.StreamHandler):
    """Log records written through tqdm, so that they land on their own line above a running progress bar. Each
    goes out in one write with its newline (tqdm.write's separate write of ``end`` let two torchrun processes' log
    lines run together on their shared, unbuffered stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record) + "\n", file=self.stream, end="")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging() -> None:
    """rdm_fast's INFO messages to stderr (clear of progress bars); other libraries' at WARNING and above only
    (faiss and open_clip log routine INFO lines that read like failures)."""
    root = logging.getLogger()
    rank = int(os.environ.get("RANK", "0"))
    if not root.handlers:
        handler = _TqdmHandler(sys.stderr)
        # under torchrun, the other processes' warnings say whose they are
        handler.setFormatter(logging.Formatter(("" if rank == 0 else f"[rank {rank}] ") + "%(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    main_process = rank == 0  # under torchrun, INFO lines once, not once per process
    logging.getLogger("rdm_fast").setLevel(logging.INFO if main_process else logging.WARNING)
    warnings.showwarning = _log_warning


# where rdm_fast's own warnings come from: its package and, run from a source checkout, the checkout's kernels/
_OWN_DIRS = tuple(os.path.join(d, "") for d in [os.path.dirname(os.path.abspath(__file__)), *(
    [os.path.join(SOURCE_CHECKOUT, "kernels")] if SOURCE_CHECKOUT else [])])


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one log line (not the file, line number and source line that warnings prints): ours
    under "rdm_fast", other libraries' under "py.warnings" with their category, as logging.captureWarnings names
    them. Ours by the file's folder, not by a folder named rdm_fast on its path: a virtual environment inside a
    checkout of that name holds the other libraries."""
    if os.path.abspath(str(filename)).startswith(_OWN_DIRS):
        logging.getLogger("rdm_fast").warning("%s", message)
    else:
        logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:  # "[Errno 17] File exists: 'x'" -> "x: File exists"
        return f"{e.filename}: {e.strerror}"
    return " ".join(line.strip() for line in str(e).splitlines()) or type(e).__name__  # not a bare "error: "


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, *,
        memory_advice: str = "") -> int:
    """Run ``main`` with INFO logging to stderr; user errors (bad arguments or input files, files that cannot be
    written, an ops mode that cannot run) become ``error: ...`` and exit status 2, and so does running out of
    GPU or host memory, followed by ``memory_advice`` (what the command can do with less, e.g. a smaller batch).
    Set RDM_FAST_DEBUG=1 to see the traceback instead. For a ``__main__``: the logging and warning setup stays
    for the process."""
    setup_logging()
    try:
        if not {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
            get_mode()  # a bad $RDM_FAST_OPS fails now, not after the model has loaded
        return main(argv)
    except (CLIError, ConfigError, CheckpointError, OSError, ValueError, FastPathUnavailable) as e:
        if os.environ.get("RDM_FAST_DEBUG"):
            raise
        _say("error: " + _one_line(e))
        return 2
    except (RuntimeError, MemoryError) as e:
        if os.environ.get("RDM_FAST_DEBUG") or not (_out_of_memory(e) or _peer_failed(e)):
            raise
        if _peer_failed(e):  # the process that failed first prints why (often after this line: it closes its
            # connections before its error reaches run) unless it was killed, which torchrun's summary then says
            _say("error: another process of this torchrun stopped (its own error line, which may come after this "
                 "one, or torchrun's summary says why): this one stops too")
            return 2
        _say(f"error: out of memory: {_memory_line(e)}" + (f"; {memory_advice}" if memory_advice else ""))
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


# failed allocations that PyTorch reports as plain RuntimeErrors: its CPU allocator's two wordings, pinned host
# memory and cuBLAS workspaces
_MEMORY_ERRORS = ("DefaultCPUAllocator: can't allocate", "DefaultCPUAllocator: not enough memory",
                  "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def _peer_failed(e: BaseException) -> bool:
    """True for a collective that failed because another torchrun process ended (a gloo or NCCL error, with a
    traceback on every surviving process before)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (isinstance(e, torch.distributed.DistError) or any(
        m in str(e) for m in ("Connection closed by peer", "Connection reset by peer")))


def _out_of_memory(e: BaseException) -> bool:
    """True for a failed allocation: CUDA's (torch.OutOfMemoryError), Python's, and those of ``_MEMORY_ERRORS``."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(m in str(e) for m in _MEMORY_ERRORS)


def _memory_line(e: BaseException) -> str:
    """The allocation that failed and what the device had, without PyTorch's allocator statistics and advice."""
    text = _one_line(e)
    for tail in (" Including non-PyTorch memory", " Of the allocated memory"):
        text = text.split(tail)[0]
    if "DefaultCPUAllocator" in text:  # "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: ..."
        text = text[text.index("DefaultCPUAllocator"):]
    return text.strip().rstrip(".")


def _say(line: str) -> None:
    """``line`` to stderr in one write: under torchrun the processes share stderr, and print's separate write of
    the newline let two processes' error lines run together. Processes other than rank 0 say which they are, as
    their log lines do."""
    rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    sys.stderr.write(("" if rank == 0 else f"[rank {rank}] ") + line + "\n")
    sys.stderr.flush()


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, refusing empty values: an empty path would otherwise mean the current
    directory (``Path("")``), or be taken for an option not given; an unknown option is reported with the usage of
    the subcommand it was given to (a parser's default ``subparser``). Applies ``--max-image-pixels``."""
    args, unknown = parser.parse_known_args(argv)
    command = args.__dict__.pop("subparser", None)  # a subcommand's parser (db): its usage, not the top level's
    if unknown:
        (command or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    for name, value in vars(args).items():
        if value == "" or (isinstance(value, list) and "" in value):
            raise CLIError(f"{_option_name(parser, name)} is empty")
    if getattr(args, "max_image_pixels", None) is not None:
        if args.max_image_pixels < 0:
            raise CLIError(f"--max-image-pixels must be 0 (no limit) or more, got {args.max_image_pixels}")
        set_max_image_pixels(args.max_image_pixels)
    return args


def add_max_image_pixels(parser: argparse.ArgumentParser) -> None:
    """The ``--max-image-pixels`` option of the commands that decode images."""
    parser.add_argument("--max-image-pixels", type=int, default=PILLOW_MAX_PIXELS, metavar="N",
                        help="refuse images of more than N pixels, a guard against decompression bombs (Pillow's "
                             "limit; 0: none, for trusted images such as large drawings)")


def _option_name(parser: argparse.ArgumentParser, dest: str) -> str:
    """How the command line spells the option (or positional argument) stored in ``dest``, subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                name = _option_name(sub, dest)
                if name != dest:
                    return name
        elif action.dest == dest:
            return max(action.option_strings, key=len) if action.option_strings else dest
    return dest


def _json_object(file: Path) -> dict:
    """The JSON object in ``file``; {} where it is missing, unreadable or not an object."""
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def folder_kind(path: str | Path) -> str | None:
    """What another rdm_fast command made of folder ``path``, told by the content of the files it writes: "a
    database" (its manifest, or a build's progress), "a training run" (checkpoints, or train's run.json), "a
    training checkpoint" (one of a run's step folders), "a model" (rdm_fast's weights, told by their metadata, or
    any ``.ckpt`` file, as official releases hold), "a sample run" (sample's run.json or images); None for anything
    else, other tools' files of the same names included."""
    from .retrieval.build import PROGRESS
    from .retrieval.database import FORMAT, MANIFEST

    path = Path(path)
    if _json_object(path / MANIFEST).get("format") == FORMAT or (path / PROGRESS / "config.json").is_file():
        return "a database"
    run = _json_object(path / "run.json")
    if (path / ckpt.RUN_CHECKPOINTS).is_dir() or "global_batch" in run:
        return "a training run"
    weights = _rdm_fast_weights(path / ckpt.WEIGHTS_FILE)
    if weights and (path / ckpt.TRAIN_STATE_FILE).is_file():
        return "a training checkpoint"
    if weights or any(p.is_file() for p in path.glob("*.ckpt")):
        return "a model"
    if "n_samples" in run or next(path.glob("sample_[0-9]*.png"), None) is not None:
        return "a sample run"
    return None


def _rdm_fast_weights(file: Path) -> bool:
    """Whether ``file`` is a safetensors file that rdm_fast wrote (its metadata says so; read from the header)."""
    try:
        return file.is_file() and ckpt.read_metadata(file).get("format") == ckpt.FORMAT_NAME
    except ckpt.CheckpointError:
        return False


def check_out_dir(path: str, kind: str | None = None) -> None:
    """CLIError unless ``--out`` ``path`` is a writable directory or one that can be made (its nearest existing
    ancestor a writable directory), holds no other command's output than ``kind`` (see :func:`folder_kind`:
    a sample run's run.json would replace a training run's, for example) and is not in use by another run;
    checked before anything slow runs."""
    if not path:
        raise CLIError("--out is empty: name a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"--out {path} is a file, not a folder")
    found = folder_kind(path) if os.path.isdir(path) else None
    if found is not None and found != kind:
        raise CLIError(f"--out {path} holds {found}: write {kind or 'this output'} into a folder of its own")
    _check_lock(path)
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CLIError(f"--out {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: cannot write in {parent} (no permission, or a read-only file system)")


def _in_use(path: str | Path, holder: str, option: str = "--out") -> CLIError:
    return CLIError(f"{option} {path} is in use by another run ({holder or 'a running process'}): wait for it to end"
                    + (", or choose another --out" if option == "--out" else ""))


def _check_lock(path: str) -> None:
    """CLIError when another run holds ``--out`` ``path`` now, told before anything slow runs (the run takes the
    lock itself later, :func:`claim_out_dir`). Rank 0 only: under torchrun it is the one that takes it."""
    file = Path(path) / LOCK_FILE
    if int(os.environ.get("RANK", "0")) != 0 or not file.is_file():
        return
    try:
        f = open(file)
    except OSError:
        return  # unreadable here: the claim decides
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise _in_use(path, f.read().strip()) from None
            return  # a file system without locks: the claim warns
        fcntl.flock(f, fcntl.LOCK_UN)


class OutDirLock:
    """An exclusive lock on an output directory (``flock`` on its ``.rdm_fast.lock``), held until :meth:`release`
    or the end of the process (a killed run's lock goes with it): a second run into the same ``--out`` is refused
    instead of mixing its files with the first's."""

    def __init__(self, path: Path, name: str | Path | None = None, option: str = "--out") -> None:
        """``name``: the ``--out`` its error names (default ``path``; db neighbors locks its progress folder), as
        ``option`` (db index: "database")."""
        self._held = False
        while True:  # again where the holder removed the file (with its folder) before it let go of it
            path.mkdir(parents=True, exist_ok=True)
            self._file = open(path / LOCK_FILE, "a+")
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):  # a file system without locks (some network mounts)
                    log.warning("cannot lock %s (%s): nothing stops another run from writing there too", path,
                                e.strerror)
                    return
                self._file.seek(0)
                holder = self._file.read().strip()
                self._file.close()
                raise _in_use(path if name is None else name, holder, option) from None
            if _still_at(self._file.fileno(), path / LOCK_FILE):
                break
            self._file.close()
        try:
            with naming_failed_writes(path / LOCK_FILE):  # a full disk: the first write of most commands
                self._file.seek(0)
                self._file.truncate()
                self._file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
                self._file.flush()
        except OSError:
            with suppress(OSError):  # the unwritten line fails again as the file is closed
                self._file.close()
            raise
        self._held = True
        _HELD_LOCKS.add(self)

    def release(self) -> None:
        """Unlock; the file stays, emptied of the holder's name so that it does not read as held (a holder that
        removes it, as db neighbors removes its progress folder, is safe too: a run that opened the removed file
        finds it gone once it holds the lock, and takes the new one)."""
        if self._held and not self._file.closed:
            self._file.truncate(0)
        self._forget()

    def _forget(self) -> None:
        """Close this process's copy of the file, leaving its contents (a forked child's: the parent holds on)."""
        _HELD_LOCKS.discard(self)
        self._held = False
        self._file.close()


@contextmanager
def holding(folder: Path, out: str | Path, option: str = "--out", *, keep_lock_file: bool = True) -> Iterator[None]:
    """Hold ``out`` (``option`` in the error that refuses a second run) by an :class:`OutDirLock` in ``folder``
    (its progress folder, or itself) while the body runs (rank 0 under torchrun): a second run into it would
    rewrite or delete the first's files. A run that leaves nothing in ``folder`` but the lock file (or nothing at
    all: ``keep_lock_file=False`` removes it, for an output that must hold only its own files) leaves no folder
    behind, nor the empty folders made for it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        make_dirs(folder)
    except NotADirectoryError as e:  # a file above it
        raise CLIError(f"{option} {out}: {e}") from None
    lock = OutDirLock(folder, out, option)
    try:
        yield
    finally:
        if not keep_lock_file:
            (folder / LOCK_FILE).unlink(missing_ok=True)
        if folder.is_dir() and [p.name for p in folder.iterdir()] in ([], [LOCK_FILE]):
            shutil.rmtree(folder)
            for parent in made[1:]:
                if any(parent.iterdir()):
                    break
                parent.rmdir()
        lock.release()


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path`` (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _forget_locks_in_child() -> None:
    """A forked process closes its copies of the lock files: a flock belongs to the open file, which fork shares,
    so a worker outliving a killed parent would otherwise keep ``--out`` locked."""
    for lock in list(_HELD_LOCKS):
        lock._forget()


os.register_at_fork(after_in_child=_forget_locks_in_child)


@contextmanager
def claim_out_dir(path: Path, share: Callable[[str | None], str | None] | None = None) -> Iterator[None]:
    """Hold ``--out`` ``path`` (:class:`OutDirLock`) while the body runs. Under torchrun rank 0 holds it; ``share``
    (``Processes.from_rank0``) tells every process whether it could, for commands whose other processes write
    there too. Without it only rank 0 fails (and torchrun ends the others)."""
    lock, problem = None, None
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            lock = OutDirLock(path)
        except CLIError as e:
            problem = str(e)
    if share is not None:
        problem = share(problem)
    if problem:
        raise CLIError(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def summary(doc: str) -> str:
    """A module docstring's first paragraph as --help text (without reStructuredText's double backquotes)."""
    return doc.split("\n\n")[0].replace("``", "")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends argparse's "(default: ...)" only where the help text states no default and there is one to show
    (not for unset options, flags or a repeatable option's empty list), so each option's default appears once."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] or \
                "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def pick_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    """The dtype of ``--bf16`` / ``--fp16`` (float32 without either)."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
