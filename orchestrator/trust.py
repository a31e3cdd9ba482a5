"""Which of a results folder's files Ray may unpickle, and the check that this user's sweep wrote
them.

Ray Tune keeps its experiment state as pickles (`tuner.pkl`, the searcher's and callbacks'
`*-state-*.pkl`, trials' `params.pkl` and `error.pkl`) and as JSON with embedded cloudpickle
blobs (`experiment_state-*.json`, `search_gen_state-*.json`); `Tuner.restore` and the results it
returns unpickle them, so whoever can write a results folder could run code as the sweep's
driver. Tune writes them in a staging folder of the driver's and copies that to the results
folder; while a sweep runs, every copy goes through `signed_upload`: each file's signature
(HMAC-SHA256 of its path in the folder and its bytes, with a key kept outside the storage:
`MULTIRES_STATE_KEY`, or a per-user key file, created on first use) is written before the file
is, beside the one of the version it replaces, and each file lands whole. So a driver killed at
any moment leaves only signed files, and a file nobody's sweep copied there (planted before the
first sweep or since) is never signed. Before a study is resumed, every such file must carry a
valid signature, or the sweep stops in one line naming the file, before anything is
unpickled. The folder may be a storage URI (s3://...): the files are listed and read through
the same pyarrow layer.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal, overload

import pyarrow.fs

from orchestrator.compat import FILESYSTEM_SYNCER, resolve
from orchestrator.errors import ConfigError, StorageError
from orchestrator.storage import (check_regular, filesystem, is_remote, join, read_text, shown,
                                  write_text)

SIGNATURES = "multires_signatures.json"
KEY_ENV = "MULTIRES_STATE_KEY"
MACS_KEPT = 2  # a file's signatures: the version in the folder and the one being copied there
OWN_FILES = ("multires_", ".multires")  # the sweep's files in the results folder, not Tune's
TUNER_STATE = "tuner.pkl"  # written by the Tuner itself, once, when a study starts
MAX_KEY_BYTES = 4096  # the key file holds 64 hex characters


def key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "multires" / "state.key"


@overload
def state_key(create: Literal[True]) -> bytes: ...
@overload
def state_key(create: bool) -> bytes | None: ...


def state_key(create: bool) -> bytes | None:
    """The signing key: MULTIRES_STATE_KEY, else the per-user key file (made when `create`).
    A key that cannot be trusted to sign (set but empty, an empty or cut file, one others may
    read or replace) is refused in one line, before any work."""
    if KEY_ENV in os.environ:
        if not os.environ[KEY_ENV].strip():
            raise ConfigError(f"{KEY_ENV} is set but empty; unset it (the per-user key file is "
                              f"used) or give it a key")
        return os.environ[KEY_ENV].encode()
    path = key_file()
    try:
        check_regular(path, "the state key", ConfigError, MAX_KEY_BYTES,
                      f"remove it (a new one is made) or set {KEY_ENV}")
        return _checked_key(path)
    except FileNotFoundError:
        if not create:
            return None
    except OSError as exc:
        raise ConfigError(f"cannot read the state key {path} ({exc.strerror}); fix its "
                          f"permissions or set {KEY_ENV}") from None
    _create_key(path)
    return _checked_key(path)


def _checked_key(path: Path) -> bytes:
    info = os.lstat(path)
    redo = (f"remove it (a new one is made; folders signed with it then need --trust-results) "
            f"or set {KEY_ENV}")
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or os.path.islink(path):
        raise ConfigError(f"the state key {path} is a link, another user's, or open to others "
                          f"(mode {info.st_mode & 0o777:o}): they could sign what Ray unpickles; "
                          f"{redo}")
    key = path.read_bytes().strip()
    if len(key) < 32:  # made whole (`_create_key`): a short one was cut or edited
        raise ConfigError(f"the state key {path} holds {len(key)} characters, not a key (a "
                          f"full disk, or edited); {redo}")
    return key


def _create_key(path: Path) -> None:
    """A new random key file, whole or absent (written aside, then linked into place)."""

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, staged = tempfile.mkstemp(dir=path.parent, prefix=".state.key.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
                f.flush()
                os.fsync(f.fileno())
            os.link(staged, path)
        finally:
            os.unlink(staged)
    except FileExistsError:
        pass  # made by a sweep started at the same time
    except OSError as exc:
        raise ConfigError(f"cannot create the state key {path} ({exc.strerror}); make "
                          f"{path.parent} writable or set {KEY_ENV}") from None


def unpickled_files(place: str) -> dict[str, tuple[int, int]]:
    """The files of a results folder (a local path or a storage URI) that Ray may unpickle, by
    name in the folder, with their (mtime, size): every `*.pkl` at any depth, and Tune's
    `*state-*.json` at the top (JSON that may embed cloudpickle). In a local folder, every
    symbolic link too (never followed: a link to `.` would be walked for ever; `check` refuses
    them, as Ray would read through them what no signature covers)."""

    fs, root = filesystem(place)
    root = root.rstrip("/")
    found = {}
    if is_remote(place):
        infos = [(info.path[len(root):].lstrip("/"), info.type, info.mtime_ns, info.size, False)
                 for info in fs.get_file_info(pyarrow.fs.FileSelector(
                     root, recursive=True, allow_not_found=True))]
    else:
        infos = list(_walk_local(root))
    for name, kind, mtime, size, link in infos:
        # Unknown: a pipe, a socket or a device (refused by `check`, as Ray would open it too).
        if link or kind in (pyarrow.fs.FileType.File, pyarrow.fs.FileType.Unknown) and \
                unpickled(name):
            found[name] = (mtime, size)
    return dict(sorted(found.items()))


def unpickled(name: str) -> bool:
    """Whether Ray may unpickle the results folder's file `name` (a path in the folder)."""
    return name.endswith(".pkl") or ("/" not in name and fnmatch(name, "*state-*.json"))


def _walk_local(root: str):
    """(name in the folder, pyarrow file type, mtime_ns, size, is a link) of a local folder's
    entries, links not followed (their type Unknown)."""

    for parent, dirs, files in os.walk(root):
        for entry in (*dirs, *files):
            path = os.path.join(parent, entry)
            try:
                info = os.lstat(path)
            except FileNotFoundError:  # removed by Tune meanwhile
                continue
            kind = (pyarrow.fs.FileType.Directory if stat.S_ISDIR(info.st_mode) else
                    pyarrow.fs.FileType.File if stat.S_ISREG(info.st_mode) else
                    pyarrow.fs.FileType.Unknown)
            yield (os.path.relpath(path, root), kind, info.st_mtime_ns, info.st_size,
                   stat.S_ISLNK(info.st_mode))


def regular(place: str, name: str) -> bool:
    """Whether the folder's file `name` is a regular file (or an object of a store), not a link.
    A pipe would block its reader for ever, and could hand Ray a pickle written when it is read;
    a device such as /dev/zero would never end; a link points where no signature covers:
    none is read, signed or accepted."""
    if is_remote(place):
        return True
    path = filesystem(place)[1].rstrip("/") + "/" + name
    if os.path.islink(path):
        return False
    try:
        check_regular(path)
    except StorageError:
        return False
    except FileNotFoundError:  # removed by Tune meanwhile: told by the read, as before
        pass
    return True


def _digest(key: bytes, place: str, name: str) -> str:
    fs, root = filesystem(place)
    mac = hmac.new(key, name.encode() + b"\0", hashlib.sha256)
    with fs.open_input_stream(f"{root.rstrip('/')}/{name}") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            mac.update(chunk)
    return mac.hexdigest()


def _read_signatures(place: str) -> dict[str, list[str]]:
    """name -> its valid signatures (one, or two while a newer version is being copied)."""
    try:
        signed = json.loads(read_text(join(place, SIGNATURES)) or "{}")
    except (OSError, ValueError, StorageError):  # then nothing is signed
        return {}
    if not isinstance(signed, dict):
        return {}
    macs = {name: [mac] if isinstance(mac, str) else mac for name, mac in signed.items()}
    return {name: [m for m in mac if isinstance(m, str)] for name, mac in macs.items()
            if isinstance(mac, list)}


def _write_signatures(place: str, signed: dict[str, list[str]]) -> None:
    write_text(join(place, SIGNATURES), json.dumps(signed, indent=0, sort_keys=True))


def sign(place: str, only: tuple[str, ...] | None = None, key: bytes | None = None) -> None:
    """Sign the folder's unpickled files as they are (`only`: those names): what
    --trust-results does, and the Tuner's own file once it has written it."""
    key = key or state_key(create=True)
    signed = _read_signatures(place)
    for name in unpickled_files(place):
        if (only is None or name in only) and regular(place, name):
            try:
                signed[name] = [_digest(key, place, name)]
            except FileNotFoundError:  # removed meanwhile
                continue
    _write_signatures(place, signed)


def check(place: str) -> bool:
    """Refuse, in one line, a results folder holding a file Ray would unpickle that this user's
    sweep did not sign (planted, edited, or from before signing). Whether there is a signed
    study to restore: the Tuner's file and Tune's saved state. Not when the Tuner's file is all
    there is and was not signed yet (a driver killed at that moment; a new Tuner replaces it,
    unread)."""
    files = unpickled_files(place)
    if not files:
        return False
    key = state_key(create=False)
    signed = _read_signatures(place)
    for name in files:
        if not is_remote(place) and os.path.islink(os.path.join(filesystem(place)[1], name)):
            raise ConfigError(f"{name} in {shown(place)} is a symbolic link (Ray would read "
                              f"what it points to, which no signature covers); remove "
                              f"{shown(place)} to start again")
        if not regular(place, name):
            raise ConfigError(f"{name} in {shown(place)} is not a regular file (a pipe, a socket "
                              f"or a device: Ray would block reading it, or be handed a pickle "
                              f"through it); remove {shown(place)} to start again")
        if key is not None and _valid(signed.get(name, []), _digest(key, place, name)):
            continue
        if list(files) == [TUNER_STATE]:
            return False
        raise ConfigError(
            f"{name} in {shown(place)} was not written by a sweep of yours (no valid "
            f"signature in {SIGNATURES}; Ray would unpickle it and could run code from it); "
            f"remove {shown(place)} to start again, or, if you made it and nobody else can "
            f"write there, add --trust-results to sign it")
    return TUNER_STATE in files and any(fnmatch(n, "experiment_state-*.json") for n in files)


def _valid(macs: list[str], digest: str) -> bool:
    return any(hmac.compare_digest(mac, digest) for mac in macs)


def signed_upload(local_path: str, fs, fs_path: str, exclude: list[str] | None = None, *,
                  place: str, key: bytes) -> None:
    """Tune's copy of its staging folder to the results folder, signed: the files are read
    once; the signatures of the unpickled ones are written first (beside the previous ones);
    then each file is written whole (a local file through a renamed temporary file)."""
    # Tune's restore copied the folder's JSON files into its staging folder, the sweep's own
    # among them: they go back never (a stale signature file would replace the current one).
    files = {name: data for name, data in _staged(local_path, exclude or []).items()
             if not name.startswith(OWN_FILES)}
    signed, changed = _read_signatures(place), False
    for name, data in files.items():
        if unpickled(name):
            mac = hmac.new(key, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()
            if mac not in signed.get(name, []):
                signed[name] = [*signed.get(name, [])[1 - MACS_KEPT:], mac]
                changed = True
    local = not is_remote(place)
    if local:
        os.makedirs(fs_path, exist_ok=True)
    if changed:
        _write_signatures(place, signed)
    for name, data in files.items():
        path = f"{fs_path.rstrip('/')}/{name}"
        if local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            staged = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp"
            with open(staged, "wb") as f:
                f.write(data)
            os.replace(staged, path)
        else:  # an object store's object is whole by itself
            with fs.open_output_stream(path) as f:
                f.write(data)


def _staged(folder: str, exclude: list[str]) -> dict[str, bytes]:
    """The bytes of a local folder's files by path in it (read once: Tune may rewrite them)."""
    files = {}
    for parent, _, names in os.walk(folder):
        for base in names:
            name = os.path.relpath(os.path.join(parent, base), folder).replace(os.sep, "/")
            if any(fnmatch(name, pattern) for pattern in exclude):
                continue
            with contextlib.suppress(FileNotFoundError):  # removed by Tune meanwhile
                files[name] = Path(folder, name).read_bytes()
    return files


@contextlib.contextmanager
def signing(place: str):
    """While the block runs (a sweep), Tune's copies of its state to the results folder `place`
    go through `signed_upload` (Tune's syncer, patched in this process only)."""
    syncer = resolve(FILESYSTEM_SYNCER)
    key, root = state_key(create=True), filesystem(place)[1].rstrip("/")
    original = syncer._sync_up_command

    def command(self, local_path: str, uri: str, exclude: list | None = None):
        if uri.rstrip("/") != root:  # not this study's folder: Ray's own copy
            return original(self, local_path, uri, exclude)
        return (functools.partial(signed_upload, place=place, key=key),
                {"local_path": local_path, "fs": self.storage_filesystem, "fs_path": uri,
                 "exclude": exclude})

    syncer._sync_up_command = command
    try:
        yield
    finally:
        syncer._sync_up_command = original
