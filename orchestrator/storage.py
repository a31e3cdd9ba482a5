"""The places the commands write to: checked before any work (`check_writable`), a failed write
told as what it is (`os_error_line`: a full disk names the place, it is not a bug), and a
study's storage as a local folder or a URI Ray Tune supports (`storage_uri`, read and written
through pyarrow's filesystems, as Tune does). pyarrow loads only when a storage is read or
written, so `--help` and a study's validation go without it."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse, urlsplit, urlunsplit

from orchestrator.errors import StorageError, short

# Object stores and HDFS: pyarrow filesystems, the ones Ray Tune's storage_path takes.
REMOTE_SCHEMES = ("s3", "gs", "hdfs")
# What an OSError of these kinds means for a place written to; anything else is a bug.
MEANING = {errno.ENOSPC: "no space left on {where}; free space there or choose another place",
           errno.EDQUOT: "no space left on {where} (disk quota); free space there or choose "
                         "another place",
           errno.EROFS: "{where} is on a read-only filesystem; choose a writable place",
           errno.EACCES: "{where}: permission denied; choose a place you can write to",
           errno.EPERM: "{where}: not permitted; choose a place you can write to",
           errno.ENAMETOOLONG: "{where}: a name in the path is too long (most filesystems "
                               "take 255 bytes); shorten it",
           errno.ELOOP: "{where}: a loop of symbolic links; fix the link",
           errno.ENOTDIR: "{where}: part of the path is a file, not a folder",
           errno.EISDIR: "{where} is a folder; give a file",
           errno.ENOENT: "{where}: no such place (or one that cannot hold files)"}
# Those that say what is wrong with a place wherever they are raised (the others, only around
# a write the project makes: elsewhere a missing file may well be a bug).
ANYWHERE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
            errno.ENAMETOOLONG, errno.ELOOP)
PROBE_BYTES = 4096  # written and removed at the start: a full disk shows at once


def os_error_line(exc: Exception, where: object = None, field: str | None = None,
                  anywhere: bool = False) -> str | None:
    """One line for an OSError of a place written to or read from (or Path.resolve's symlink
    loop, a RuntimeError before Python 3.13), or None: not one we know (with `anywhere`, not one
    of ANYWHERE)."""
    if isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop from "):
        exc = OSError(errno.ELOOP, "symlink loop", str(exc).split("from ", 1)[1].strip("'"))
    if getattr(exc, "errno", None) is None and "No space left on device" in str(exc):
        # Raised again without its errno: a DataLoader worker's error re-raised in the training
        # process, or torch's shared memory (/dev/shm, where workers hand over their batches).
        shm = "/torch_" in str(exc) or "shared memory" in str(exc)
        exc = OSError(errno.ENOSPC, "No space left on device",
                      "shared memory (/dev/shm)" if shm else None)
    code: int | None = getattr(exc, "errno", None)
    meaning = MEANING.get(code) if code is not None and (code in ANYWHERE or not anywhere) else None
    if meaning is None:
        return None
    where = short(getattr(exc, "filename", None) or where or "this place")
    return f"{field}: {meaning.format(where=where)}" if field else meaning.format(where=where)


def check_regular(path: str | os.PathLike[str], field: str | None = None, error: type = StorageError,
                  limit: int | None = None, fix: str = "give a file") -> None:
    """Before a file is opened to be read back: it is a regular file (a FIFO would block the
    read for ever, a device such as /dev/zero would never end), of at most `limit` bytes;
    else one line of `error` naming `field` and the file, and `fix`. A missing file raises
    FileNotFoundError, for the caller to tell as it means."""
    where = f"{field} {short(path)}" if field else short(path)
    try:
        info = os.stat(path)  # follows a symbolic link to what it points to
    except FileNotFoundError:
        raise
    except OSError as exc:  # a symbolic link loop, a name too long, a file as a folder, ...
        reading = exc.errno in (errno.EACCES, errno.EPERM)
        line = None if reading else os_error_line(exc, path, field)
        raise error(line or f"{where}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{where} is a folder; {fix}")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{where} is not a regular file (a pipe, a socket or a device); {fix}")
    if limit is not None and info.st_size > limit:
        raise error(f"{where} is {info.st_size:,} bytes, more than the {limit:,} such a file "
                    f"holds; {fix}")
    if not os.access(path, os.R_OK):  # else the open says "permission denied" as for a write
        raise error(f"{where} cannot be read (permission denied); make it readable to you, or "
                    f"give another file")


@contextlib.contextmanager
def writing(path: object, field: str | None = None):
    """Around a write: an OSError we know becomes a `StorageError` naming `path` (a write to an
    open file raises without the file's name), also where a library reports it as another error
    (torch.save: a RuntimeError whose context is the OSError)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__context__
        line = os_error_line(cause, path, field) if isinstance(cause, OSError) else None
        if line is None:
            raise
        raise StorageError(line) from None


def is_remote(place: str) -> bool:
    return urlparse(str(place)).scheme in REMOTE_SCHEMES


def storage_uri(value: str, field: str = "storage_path") -> str:
    """A study's storage: an absolute local folder (a plain path or file://), or an s3://,
    gs:// or hdfs:// URI kept as it is (Tune writes there through pyarrow, which also reads the
    URI's options: `?endpoint_override=HOST:PORT&scheme=http`, ...); any other scheme is
    refused."""
    scheme = urlparse(value).scheme
    if scheme in REMOTE_SCHEMES:
        parts = urlsplit(value)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/")))
    if scheme == "file":
        value = urlparse(value).path
    elif scheme and len(scheme) > 1:  # a Windows drive letter is no scheme
        raise StorageError(f"{field} {short(value)}: scheme {short(repr(scheme), 60)} is not "
                           f"supported; give a folder or a URI starting with "
                           f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    return str(resolve(value, field))


def resolve(path: str | Path, field: str) -> Path:
    """An absolute path; a loop of symbolic links is the user's to fix, not a bug."""
    try:
        return Path(path).expanduser().resolve()
    except RuntimeError:  # Python < 3.13 reports a symlink loop so
        raise StorageError(f"{field} {short(path)}: a loop of symbolic links; fix the "
                           f"link") from None
    except OSError as exc:
        raise StorageError(os_error_line(exc, path, field) or f"{field} {short(path)}: "
                           f"{exc.strerror}") from None


def join(place: str, *parts: str) -> str:
    """A path inside `place`; in a URI, before its options."""
    if not is_remote(place):
        return str(Path(place, *parts))
    split = urlsplit(str(place))
    return urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *parts])))


def shown(place: object) -> str:
    """A place as messages show it: a URI without its credentials and options."""
    if not is_remote(str(place)):
        return short(place)
    split = urlsplit(str(place))
    return short(urlunsplit(split._replace(netloc=split.netloc.rpartition("@")[2], query="")))


def filesystem(place: str):
    """(pyarrow filesystem, path within it) of a local path or a remote URI."""
    import pyarrow.fs

    if is_remote(place):
        return pyarrow.fs.FileSystem.from_uri(place)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(place)  # pyarrow wants absolute paths


MAX_STATE_BYTES = 16 << 20  # the project's own state files are a few KB


def read_text(place: str, limit: int = MAX_STATE_BYTES, fix: str = "give a file") -> str | None:
    """A small file of the storage, or None when there is none. A folder, a pipe or a device in
    its place, or a file over `limit` bytes, is a `StorageError` (its line ends with `fix`);
    bytes that are not UTF-8 a UnicodeDecodeError (a ValueError, as a malformed file is)."""
    if not is_remote(place):
        try:
            check_regular(place, limit=limit, fix=fix)
        except FileNotFoundError:
            return None
        with open(place, "rb") as f:
            return f.read(limit + 1).decode()
    import pyarrow.fs

    fs, path = filesystem(place)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        return None
    if info.type != pyarrow.fs.FileType.File:
        raise StorageError(f"{shown(place)} is a folder; {fix}")
    if info.size is not None and info.size > limit:
        raise StorageError(f"{shown(place)} is {info.size:,} bytes, more than the {limit:,} such "
                           f"a file holds; {fix}")
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(place: str, text: str) -> None:
    """Whole or absent: a local file through a renamed temporary file; an object store's object
    is whole by itself."""
    with writing(place):
        if not is_remote(place):
            path = Path(place)
            staged = path.with_name(f".{path.name}.tmp")
            staged.write_text(text)
            staged.replace(path)
            return
        fs, path = filesystem(place)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())


def check_still_there(place: str, field: str = "storage_path") -> None:
    """A study's results place that went away while it ran (a bucket or a folder deleted): one
    line naming it, instead of the error Tune meets next."""
    import pyarrow.fs

    fs, path = filesystem(place)
    try:
        gone = fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound
    except OSError:  # the store cannot be asked: the error that came first stands
        return
    if gone:
        raise StorageError(f"{field} {shown(place)} went away while the study ran (deleted?) "
                           f"and the study's state with it; create it again and run the same "
                           f"command to start the study over, or give another --storage-path")


def upload(folder: Path, place: str) -> None:
    """A local folder's files to a place of the storage (a remote study's report)."""
    import pyarrow.fs

    fs, path = filesystem(place)
    with writing(shown(place)):
        pyarrow.fs.copy_files(str(folder), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)


def check_writable(place: str | Path, field: str, file: bool = False) -> None:
    """Before any work: `place` (a folder, or with `file` a file's path) can be written, with
    room for a first block. Nothing is left behind: folders made for the check are removed."""
    if is_remote(str(place)):
        return _check_remote(str(place), field)
    path = Path(place).expanduser()
    if file:
        if path.is_dir():
            raise StorageError(f"{field} {short(path)} is a folder; give a file")
        if path.exists():
            if stat.S_ISFIFO(path.stat().st_mode):  # opened to write, it waits for a reader
                _check_pipe(path, field)
                return
            with writing(path, field), open(path, "a"):
                return
        path = path.parent
    try:
        created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    except OSError as exc:
        raise StorageError(os_error_line(exc, path, field) or f"{field} {short(path)}: "
                           f"{exc.strerror}") from None
    if path.exists() and not path.is_dir():
        raise StorageError(f"{field} {short(path)} is a file; give a folder")
    try:
        with writing(path, field):
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path) as probe:
                probe.write(b"\0" * PROBE_BYTES)
                probe.flush()
                os.fsync(probe.fileno())
    finally:
        for made in created:
            with contextlib.suppress(OSError):
                made.rmdir()


def _check_pipe(path: Path, field: str) -> None:
    """A named pipe written to: some process must read it, or the first write waits for ever."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        raise StorageError(f"{field} {short(path)} is a named pipe that no process reads; start "
                           f"its reader first, or give a file") from None


def uri_problem(value: str) -> str | None:
    """What is wrong with the shape of a storage URI (no bucket, a space, `..`, a file:// URI
    with a host or no path), or None; a plain folder is always fine."""
    parts = urlsplit(value)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return "a file URI takes an absolute path: file:///PATH (or give the folder)"
    elif parts.scheme in REMOTE_SCHEMES:
        if not parts.netloc.rpartition("@")[2]:
            return f"no bucket (or host); give {parts.scheme}://BUCKET/PATH"
        if any(c.isspace() for c in value):
            return "a space in the URI; percent-encode it (%20) or rename"
        if {".", ".."} & set(parts.path.split("/")):
            return "a . or .. in the URI's path; give the path without them"
    return None


REMOTE_CHECK_S = 60  # a store that has not taken the first write by then is unreachable
# The first write, in a process of its own: pyarrow's calls cannot be interrupted, and its
# S3 client waits at exit for a request in flight.
_PROBE = """import sys, pyarrow.fs
try:
    fs, path = pyarrow.fs.FileSystem.from_uri(sys.argv[1])
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(path.rstrip("/") + "/.multires-write-check") as f:
        f.write(b"\\0")
    fs.delete_file(path.rstrip("/") + "/.multires-write-check")
except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
    print((str(exc).strip().splitlines() or ["?"])[0])
    sys.exit(1)
"""


def _check_remote(place: str, field: str) -> None:
    """Whether the store takes a first write within REMOTE_CHECK_S (a blocked network, a
    store that retries for ever: one line, not a hang); Ctrl-C and SIGTERM stop the wait."""

    probe = subprocess.Popen([sys.executable, "-c", _PROBE, place], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = probe.communicate(timeout=REMOTE_CHECK_S)
    except subprocess.TimeoutExpired:
        raise StorageError(f"{field} {shown(place)}: no answer in {REMOTE_CHECK_S} s; check "
                           f"the URI, the network and the credentials") from None
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    if probe.returncode:
        first = out.strip() or f"exit status {probe.returncode}"
        raise StorageError(f"{field} {shown(place)}: cannot write there ({short(first, 160)}); "
                           f"check the URI and its credentials")
