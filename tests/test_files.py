"""The atomic-write helpers: a file appears under its final name complete, or not at all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from rdm_fast._files import TEMP_SUFFIX, atomic_npy_memmap, make_dirs, map_npz, not_a_file, remove_stale_temps


def test_memmap_is_filled_on_disk_and_renamed_when_done(tmp_path):
    target = tmp_path / "m.npy"
    with atomic_npy_memmap(target, np.float16, (5, 3)) as a:
        assert isinstance(a, np.memmap)  # backed by the temporary file, not by RAM
        assert not target.exists() and len(list(tmp_path.glob(f".m.npy.*{TEMP_SUFFIX}"))) == 1
        a[1:4] = np.arange(9, dtype=np.float32).reshape(3, 3)
    want = np.zeros((5, 3), np.float16)
    want[1:4] = np.arange(9).reshape(3, 3)
    np.testing.assert_array_equal(np.load(target), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npy"]


def test_memmap_error_leaves_nothing(tmp_path):
    target = tmp_path / "m.npy"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="stop"), atomic_npy_memmap(target, np.float32, (4,)) as a:
        a[:] = 1
        raise RuntimeError("stop")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.npy"]


def test_memmap_of_no_rows(tmp_path):
    with atomic_npy_memmap(tmp_path / "e.npy", np.float16, (0, 2, 3)) as a:
        assert a.shape == (0, 2, 3)
    assert np.load(tmp_path / "e.npy").shape == (0, 2, 3)


def test_remove_stale_temps_only_touches_temporaries(tmp_path):
    (tmp_path / ".a.npy.x1" f"{TEMP_SUFFIX}").write_bytes(b"half")
    (tmp_path / "a.npy").write_bytes(b"done")
    (tmp_path / ".hidden").write_bytes(b"keep")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "a.npy"]


def test_remove_stale_temps_of_named_targets_only(tmp_path):
    for name in (".model.safetensors.a1.tmp", ".config.json.b2.tmp", ".other.c3.tmp", ".model.safetensorsX.d4.tmp"):
        (tmp_path / name).write_bytes(b"half")
    assert remove_stale_temps(tmp_path, ["model.safetensors", "config.json"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.safetensorsX.d4.tmp", ".other.c3.tmp"]


def test_memmap_claims_its_disk_space_first(tmp_path, monkeypatch):
    """The space is allocated before any write through the map: a full disk is an OSError raised at the start
    (where a write through the map would get SIGBUS), and no temporary file is left."""
    import errno
    import os

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    claimed = []

    def full(fd, offset, length):
        claimed.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space left"), atomic_npy_memmap(tmp_path / "m.npy", np.float16, (1000, 8)):
        raise AssertionError("the block ran on unclaimed space")
    assert claimed and claimed[0] >= 1000 * 8 * 2 and list(tmp_path.iterdir()) == []


def test_make_dirs_names_the_file_in_the_way(tmp_path):
    make_dirs(tmp_path / "a" / "b")
    make_dirs(tmp_path / "a" / "b")  # exists: fine
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    for target in (tmp_path / "f", tmp_path / "f" / "sub", tmp_path / "f" / "sub" / "deeper"):
        with pytest.raises(NotADirectoryError) as e:
            make_dirs(target)
        assert str(e.value) == f"{tmp_path / 'f'} is a file, not a folder"


def test_a_serialisers_error_is_an_oserror_naming_the_file(tmp_path):
    """torch.save and safetensors report a full disk as their own errors (RuntimeError, SafetensorError): the
    command lines show OSErrors as one line, so atomic_write names the target in one; nothing is left behind."""
    from rdm_fast._files import atomic_write

    def full_disk(path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64 vs 0")

    with pytest.raises(OSError, match=r"cannot write .*w\.pt: \[enforce fail .*unexpected pos") as e:
        atomic_write(tmp_path / "w.pt", full_disk)
    assert isinstance(e.value.__cause__, RuntimeError) and list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):  # not an error of the write: passed on as it is
        atomic_write(tmp_path / "w.pt", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert list(tmp_path.iterdir()) == []


def test_an_oserror_names_the_target_not_its_temporary_name(tmp_path):
    """A target that is a folder fails at the rename, a full disk while writing: either names the file the user
    asked for (the command lines print "FILE: reason"), keeping the error's type."""
    from rdm_fast._cli import _one_line
    from rdm_fast._files import atomic_write
    (tmp_path / "x.png").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic_write(tmp_path / "x.png", lambda path: open(path, "wb").close())
    assert _one_line(e.value) == f"{tmp_path / 'x.png'}: Is a directory"
    assert str(e.value) == f"[Errno 21] Is a directory: '{tmp_path / 'x.png'}'"  # as the API's callers see it

    def full(path):
        raise OSError(28, "No space left on device", path)

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "y.npy", full)
    assert _one_line(e.value) == f"{tmp_path / 'y.npy'}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_remove_stale_temps_of_patterns(tmp_path):
    for name in (".sample_00001.png.a1.tmp", ".run.json.b2.tmp", ".mine.c3.tmp", "sample_00002.png"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temps(tmp_path, ["sample_*.png", "run.json"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.c3.tmp", "sample_00002.png"]


def test_out_dir_lock_names_its_file_when_the_disk_is_full(tmp_path):
    """Writing the holder's name into the lock file is the first write of sample, train and db neighbors: on a
    full disk it said only "[Errno 27] File too large" (and closing the file raised the error a second time)."""
    from rdm_fast._cli import OutDirLock, _one_line

    with pytest.raises(OSError) as e, file_size_limit(0):
        OutDirLock(tmp_path / "out")
    assert _one_line(e.value) == f"{tmp_path / 'out' / '.rdm_fast.lock'}: File too large"
    OutDirLock(tmp_path / "out").release()  # with room, the same folder is claimed


def test_out_dir_lock_refuses_a_second_holder(tmp_path):
    """One run at a time per --out: a second lock (another process, or another open here: flock locks belong to
    the open file) is refused naming the holder; released, the directory can be claimed again."""
    import os

    from rdm_fast._cli import CLIError, OutDirLock, claim_out_dir

    first = OutDirLock(tmp_path / "out")
    with pytest.raises(CLIError, match=f"--out .*out is in use by another run \\(process {os.getpid()} on "):
        OutDirLock(tmp_path / "out")
    with pytest.raises(CLIError, match="is in use by another run"), claim_out_dir(tmp_path / "out"):
        pass
    first.release()
    assert (tmp_path / "out" / ".rdm_fast.lock").read_text() == ""  # it read "process N on HOST" after the run
    with claim_out_dir(tmp_path / "out"):
        with pytest.raises(CLIError, match="is in use"):
            OutDirLock(tmp_path / "out")
    OutDirLock(tmp_path / "out").release()
    held, shared = OutDirLock(tmp_path / "out"), []

    def share(problem):  # Processes.from_rank0 in one process
        shared.append(problem)
        return problem

    with pytest.raises(CLIError, match="is in use"), claim_out_dir(tmp_path / "out", share):
        pass
    held.release()
    assert len(shared) == 1 and "is in use" in shared[0]  # what rank 0 tells the other processes


def test_out_dir_lock_replaces_a_killed_holders_name(tmp_path):
    """A killed run leaves its line in the lock file (release empties it): the next holder's line replaces it, so
    that a refused run names the live holder, not the dead one."""
    import os
    import socket

    from rdm_fast._cli import OutDirLock

    (tmp_path / ".rdm_fast.lock").write_text("process 1 on a-host-long-gone, with a longer line than ours\n")
    lock = OutDirLock(tmp_path)
    assert (tmp_path / ".rdm_fast.lock").read_text() == f"process {os.getpid()} on {socket.gethostname()}\n"
    lock.release()


def test_only_rank_0_checks_and_takes_the_out_lock(tmp_path, monkeypatch):
    """Under torchrun rank 0 takes --out's lock: the other processes do not check it (rank 0 of their own run may
    hold it by then) and take none; rank 0's answer, shared, decides for them."""
    from rdm_fast._cli import CLIError, OutDirLock, check_out_dir, claim_out_dir

    held = OutDirLock(tmp_path / "out")
    with pytest.raises(CLIError, match="is in use by another run"):
        check_out_dir(str(tmp_path / "out"))
    monkeypatch.setenv("RANK", "1")
    check_out_dir(str(tmp_path / "out"))
    held.release()
    with claim_out_dir(tmp_path / "free", lambda problem: problem):
        pass
    assert not (tmp_path / "free").exists()  # no lock taken on rank 1
    refused = claim_out_dir(tmp_path / "free", lambda problem: "rank 0's refusal")
    with pytest.raises(CLIError, match="^rank 0's refusal$"), refused:
        pass


def test_out_dir_check_names_the_holder(tmp_path):
    """check_out_dir's early refusal names the run that holds --out, as the lock's own refusal does (it read the
    lock file from its end, or not at all, and said "a running process")."""
    import os

    from rdm_fast._cli import CLIError, OutDirLock, check_out_dir

    held = OutDirLock(tmp_path / "out")
    with pytest.raises(CLIError, match=f"is in use by another run \\(process {os.getpid()} on "):
        check_out_dir(str(tmp_path / "out"))
    held.release()


@pytest.mark.parametrize("code", ["EACCES", "ENOLCK"])
def test_out_dir_lock_on_file_systems_that_refuse_or_lack_flock(tmp_path, monkeypatch, caplog, code):
    """flock held elsewhere may fail with EACCES instead of EAGAIN (both read as "in use"); a file system without
    locks (ENOLCK, some network mounts) lets the run go on with a warning, and leaves the lock file as it was."""
    import errno
    import fcntl
    import os

    from rdm_fast._cli import CLIError, OutDirLock, check_out_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".rdm_fast.lock").write_text("process 7 on elsewhere\n")
    real = fcntl.flock

    def flock(f, op):
        if op & fcntl.LOCK_EX:
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    if code == "EACCES":
        with pytest.raises(CLIError, match=r"in use by another run \(process 7 on elsewhere\)"):
            check_out_dir(str(tmp_path / "out"))
        with pytest.raises(CLIError, match=r"in use by another run \(process 7 on elsewhere\)"):
            OutDirLock(tmp_path / "out")
        return
    check_out_dir(str(tmp_path / "out"))
    OutDirLock(tmp_path / "out").release()
    assert "cannot lock" in caplog.text and "nothing stops another run from writing there too" in caplog.text
    assert (tmp_path / "out" / ".rdm_fast.lock").read_text() == "process 7 on elsewhere\n"


def test_out_dir_lock_removed_by_its_holder(tmp_path, monkeypatch):
    """db neighbors removes its locked progress folder, then lets go of the lock: a run that opened the lock file
    before the removal takes the new file instead of the removed one (which would let a third run in beside it)."""
    import fcntl
    import shutil

    from rdm_fast._cli import CLIError, OutDirLock

    first, real = [OutDirLock(tmp_path / "out")], fcntl.flock

    def flock(f, op):  # the first run ends between the second's opening of the file and its flock
        if first:
            shutil.rmtree(tmp_path / "out")
            first.pop().release()
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    second = OutDirLock(tmp_path / "out")
    with pytest.raises(CLIError, match="is in use by another run"):
        OutDirLock(tmp_path / "out")
    second.release()


def test_out_dir_lock_is_not_kept_by_forked_children(tmp_path):
    """flock belongs to the open file, which fork shares: a DataLoader worker outliving its killed parent kept
    --out locked. Children close their copies, so only the process that took the lock holds it."""
    import os
    import time

    from rdm_fast._cli import OutDirLock

    lock = OutDirLock(tmp_path)
    started, ready = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its fork hooks have run): outlives the parent's hold on the lock
        os.write(ready, b"1")
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"1"
        assert f"process {os.getpid()} on" in (tmp_path / ".rdm_fast.lock").read_text()  # the child kept it whole
        lock.release()
        OutDirLock(tmp_path).release()  # refused while the child still held its copy
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(started)
        os.close(ready)


def _npz_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"ids": rng.integers(-5, 10**9, (37, 5)), "scores": rng.standard_normal((37, 5)).astype(np.float32),
            "fortran": np.asfortranarray(rng.standard_normal((6, 4))), "digest": np.array("ab" * 32),
            "scalar": np.float16(1.5), "empty": np.zeros((0, 3), np.int32), "bytes": np.array([b"x", b"yz"]),
            "bools": rng.random(11) > 0.5, "wide" * 10: np.arange(3, dtype=">i4")}


@pytest.mark.parametrize("compressed", [False, True])
def test_map_npz_equals_np_load(tmp_path, compressed):
    arrays = _npz_arrays()
    (np.savez_compressed if compressed else np.savez)(tmp_path / "a.npz", **arrays)
    mapped = map_npz(tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert sorted(mapped) == sorted(z.files)
        for name in z.files:
            expected = z[name]
            assert mapped[name].dtype == expected.dtype and mapped[name].shape == expected.shape, name
            np.testing.assert_array_equal(mapped[name], expected, err_msg=name)
            assert mapped[name].flags.f_contiguous == expected.flags.f_contiguous, name
            # stored members are mapped, not read (except empty ones, which cannot be mapped)
            assert isinstance(mapped[name], np.memmap) == (not compressed and expected.size > 0), name
    assert mapped["ids"].flags.writeable == compressed  # maps are read-only


def test_map_npz_refuses_damaged_archives(tmp_path):
    import zipfile
    np.savez(tmp_path / "a.npz", ids=np.arange(100))
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        map_npz(tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        map_npz(tmp_path / "text.npz")
    np.savez(tmp_path / "obj.npz", ok=np.arange(3), obj=np.array([{"a": 1}], object))
    with pytest.raises(ValueError, match="obj.npy holds Python objects"):
        map_npz(tmp_path / "obj.npz")
    # a member whose header promises more rows than it holds (its archive is otherwise intact)
    header = np.lib.format.header_data_from_array_1_0(np.arange(100))
    with zipfile.ZipFile(tmp_path / "short.npz", "w", zipfile.ZIP_STORED) as z, z.open("ids.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.arange(99).tobytes())  # one row short: the smallest shortfall is caught
    with pytest.raises(ValueError, match="ids.npy is truncated"):
        map_npz(tmp_path / "short.npz")
    with pytest.raises(FileNotFoundError):
        map_npz(tmp_path / "missing.npz")


def test_map_npz_checks_each_members_crc(tmp_path, monkeypatch):
    """A flipped bit inside a mapped member (a neighbour id off by one would pass every range check) is refused,
    as np.load refuses it; checked in blocks, also where the member is not a multiple of the block."""
    import rdm_fast._files as files
    monkeypatch.setattr(files, "CRC_BLOCK", 100)
    np.savez(tmp_path / "a.npz", ids=np.arange(517), other=np.arange(3))
    data = bytearray((tmp_path / "a.npz").read_bytes())
    assert map_npz(tmp_path / "a.npz")["ids"][200] == 200
    at = data.index(np.int64(200).tobytes())
    data[at] ^= 1
    (tmp_path / "a.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"member ids.npy is corrupted \(its CRC-32 does not match\)"):
        map_npz(tmp_path / "a.npz")


def test_map_npz_reads_other_npy_versions(tmp_path):
    import zipfile
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    with zipfile.ZipFile(tmp_path / "v3.npz", "w", zipfile.ZIP_STORED) as z, z.open("a.npy", "w") as f:
        np.lib.format.write_array(f, array, version=(3, 0))
    mapped = map_npz(tmp_path / "v3.npz")["a"]
    assert not isinstance(mapped, np.memmap) and np.array_equal(mapped, array)


def test_a_missing_folder_names_the_target(tmp_path):
    from rdm_fast._cli import _one_line
    from rdm_fast._files import atomic_write
    with pytest.raises(FileNotFoundError) as e:
        atomic_write(tmp_path / "gone" / "x.npz", lambda path: None)
    assert _one_line(e.value) == f"{tmp_path / 'gone' / 'x.npz'}: No such file or directory"
    assert str(e.value) == f"[Errno 2] No such file or directory: '{tmp_path / 'gone' / 'x.npz'}'"


def test_a_failed_write_names_the_target(tmp_path, monkeypatch):
    """A full disk or a file-size limit fails a write(2), whose OSError names no file ("[Errno 27] File too large"
    was all a failed db build said): the atomic writers name the target, and leave nothing behind."""
    import errno
    import os

    from rdm_fast._cli import _one_line
    from rdm_fast._files import atomic_save_npy, atomic_write, atomic_write_json

    def full(path):
        with open(path, "wb") as f:
            f.write(b"half")
            raise OSError(errno.EFBIG, "File too large")

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "a.bin", full)
    assert _one_line(e.value) == f"{tmp_path / 'a.bin'}: File too large"
    monkeypatch.setattr(np, "save", lambda f, *a, **k: full(f.name))
    with pytest.raises(OSError) as e:
        atomic_save_npy(tmp_path / "b.npy", np.zeros(3))
    assert _one_line(e.value) == f"{tmp_path / 'b.npy'}: File too large"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as e:
        atomic_write_json(tmp_path / "c.json", {})
    assert _one_line(e.value) == f"{tmp_path / 'c.json'}: Input/output error"
    with pytest.raises(OSError) as e, atomic_npy_memmap(tmp_path / "d.npy", np.float16, (4, 2)):
        pass  # the flush to disk fails
    assert _one_line(e.value) == f"{tmp_path / 'd.npy'}: Input/output error"
    with pytest.raises(OSError) as e, atomic_npy_memmap(tmp_path / "e.npy", np.float16, (4, 2)):
        raise OSError(errno.EIO, "Input/output error")  # the caller's own error (e.g. reading an input): as it is
    assert _one_line(e.value) == "[Errno 5] Input/output error"
    assert list(tmp_path.iterdir()) == []


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes of a file fail with EFBIG ("File too large"), as on a full disk."""
    import resource
    import signal

    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_short_write_of_np_save_names_the_target(tmp_path):
    """np.save writes an array with tofile, which reports a full disk as an OSError without errno ("12800
    requested and 10176 written"): printed alone, it named no file. atomic_write names the target."""
    from rdm_fast._files import atomic_save_npy

    with pytest.raises(OSError) as e, file_size_limit(4096):
        atomic_save_npy(tmp_path / "a.npy", np.zeros(8192, np.uint8))
    assert str(e.value).startswith(f"cannot write {tmp_path / 'a.npy'}: ") and list(tmp_path.iterdir()) == []


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """mkstemp makes its temporary files 0600: the renamed files get 0666 less the umask, as open() would give
    them (models, databases and samples shared with other users or groups were unreadable to them)."""
    import os
    import stat

    from rdm_fast._files import atomic_save_npy, atomic_write_json

    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_json(tmp_path / "a.json", {})
    atomic_save_npy(tmp_path / "b.npy", np.zeros(3))
    with atomic_npy_memmap(tmp_path / "c.npy", np.float16, (4, 2)):
        pass
    for name in ("a.json", "b.npy", "c.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_the_temporary_file_lies_beside_its_target(tmp_path):
    """The temporary file is made in the target's folder (a rename across file systems is no atomic replacement)
    and named ``.NAME.*.tmp``, the names remove_stale_temps finds after a kill."""
    from rdm_fast._files import atomic_write

    seen = []

    def write(path):
        seen.append(path)
        open(path, "wb").close()

    atomic_write(tmp_path / "x.bin", write)
    (tmp_path / "sub").mkdir()
    atomic_write(tmp_path / "sub" / "y.bin", write)
    for tmp, folder, name in zip(map(Path, seen), (tmp_path, tmp_path / "sub"), ("x.bin", "y.bin"), strict=True):
        assert tmp.parent == folder and tmp.name.startswith(f".{name}.") and tmp.name.endswith(TEMP_SUFFIX), tmp


def test_remove_stale_temps_leaves_folders(tmp_path):
    """Only files are temporaries: a folder whose name matches (".cache.tmp") is left, not unlinked (which raised
    IsADirectoryError and stopped the cleanup)."""
    (tmp_path / ".cache.tmp").mkdir()
    (tmp_path / ".a.npy.x1.tmp").write_bytes(b"half")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.tmp"]


def test_array_file_problem_names_what_the_file_is(tmp_path):
    """The reason np.load failed, in words: a file of other bytes is "not a NumPy .npy or .npz file" (NumPy's own
    message suggests allow_pickle); an .npz (a zip archive) or .npy with a problem gets NumPy's message."""
    from rdm_fast._files import array_file_problem

    (tmp_path / "t.npy").write_text("hello")
    assert array_file_problem(tmp_path / "t.npy", ValueError("x")) == "not a NumPy .npy or .npz file"
    np.savez(tmp_path / "a.npz", a=np.arange(3))
    assert array_file_problem(tmp_path / "a.npz", ValueError("bad  member\n name")) == "bad member name"
    np.save(tmp_path / "o.npy", np.array([{}], object))
    assert array_file_problem(tmp_path / "o.npy", ValueError("Object arrays cannot be loaded when allow_pickle=False")
                              ) == "it holds Python objects (pickled), not numbers"
    assert array_file_problem(tmp_path / "missing.npy", ValueError("x")) == "No such file or directory"


def test_make_dirs_passes_on_an_error_of_no_file_in_the_way(tmp_path):
    """A dangling symbolic link where the folder goes is no file in the way: mkdir's own FileExistsError is passed
    on, not "... is a file, not a folder"."""
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "link")


def test_naming_failed_writes_names_the_target(tmp_path):
    """An OSError of the block that names the temporary file, or no file (a failed write(2)), names the target
    instead, keeping its errno; one naming another file (an input) is passed on as it is."""
    from rdm_fast._files import naming_failed_writes

    tmp = str(tmp_path / ".t.npy.x1.tmp")
    for filename in (tmp, None):
        with pytest.raises(OSError) as e, naming_failed_writes(tmp_path / "t.npy", tmp):
            raise OSError(28, "No space left on device", filename)
        assert (e.value.errno, e.value.filename) == (28, str(tmp_path / "t.npy")), filename
    with pytest.raises(FileNotFoundError) as e, naming_failed_writes(tmp_path / "t.npy", tmp):
        raise FileNotFoundError(2, "No such file or directory", "/elsewhere/input.png")
    assert e.value.filename == "/elsewhere/input.png"


def test_not_a_file_says_why(tmp_path):
    """Each kind of path that is not a regular file gets its own reason; a pipe was reported as missing."""
    assert not_a_file(tmp_path / "none") == "does not exist"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.npy")
    assert not_a_file(tmp_path / "dangling") == f"is a broken link (to {tmp_path / 'gone.npy'})"
    assert not_a_file(tmp_path) == "is a directory"
    (tmp_path / "to_dir").symlink_to(tmp_path)
    assert not_a_file(tmp_path / "to_dir") == "is a directory"
    os.mkfifo(tmp_path / "pipe")
    assert not_a_file(str(tmp_path / "pipe")).startswith("is not a regular file (a pipe, socket or device)")
