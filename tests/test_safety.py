"""Safety: a local Ray listens on loopback only; checkpoints and study files never run code."""
import contextlib
import ipaddress
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.run.checkpoint import load_checkpoint
from orchestrator.commands.sweep import main as sweep_main


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue
        ppid = int(rest.rsplit(") ", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(pid))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def listening_addresses(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds."""
    listening = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                raw, port = fields[1].split(":")
                words = bytes.fromhex(raw)  # 32-bit words in host (little-endian) order
                packed = b"".join(words[i:i + 4][::-1] for i in range(0, len(words), 4))
                listening[fields[9]] = (str(ipaddress.ip_address(packed)), int(port, 16))
    held = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                held.append(listening[target[8:-1]])
    return held


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_local_ray_listens_on_loopback_only(ray_address):
    """The Ray the commands start (the test run's is started the same way): every server it
    runs (GCS, raylet, workers, dashboard, agents) on 127.0.0.1."""
    held = listening_addresses(descendants(os.getpid()))
    assert len(held) >= 5  # GCS, raylet, dashboard, agents...
    assert [h for h in held if not is_loopback(h[0])] == []


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_training_listens_on_loopback_only(ray_address, tmp_path):
    """While a two-rank run trains, its process group's store and gloo's sockets are on
    127.0.0.1 (torch's own rendezvous puts the store on every interface)."""
    from orchestrator.commands.train import main as train_main

    before = set(listening_addresses(descendants(os.getpid())))
    seen: set[tuple[str, int]] = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(listening_addresses(descendants(os.getpid())))
            done.wait(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        code = train_main(["--dataset", "synthetic", "--depth", "8", "--epochs", "3",
                           "--train-size", "512", "--test-size", "128", "--batch-size", "32",
                           "--parallel", "dp=2", "--checkpoint-dir", str(tmp_path / "ck")])
    finally:
        done.set()
        watcher.join()
    assert code == 0
    opened = seen - before
    assert len(opened) >= 3  # the store, and gloo's listener on each rank
    assert [h for h in opened if not is_loopback(h[0])] == []


class RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_code_is_refused(tmp_path):
    payload = RunsCode()
    payload.marker = tmp_path / "ran"
    torch.save({"model": {}, "epoch": 1, "payload": payload}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not (tmp_path / "ran").exists()


def test_study_file_tags_are_not_executed(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(f"name: !!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n")
    assert sweep_main([str(study), "--storage-path", str(tmp_path / "results")]) == 2
    assert "the tag !!python/object/apply:os.system is not read" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


# A results folder as a sweep leaves it (the files Ray unpickles on resume, by their real names).
TUNE_STATE = ("tuner.pkl", "experiment_state-2026-01-01_00-00-00.json",
              "searcher-state-2026-01-01_00-00-00.pkl",
              "search_gen_state-2026-01-01_00-00-00.json",
              "d8-k1-w1-s0_1_arch=d8-k1-w1,seed=0_2026-01-01_00-00-00/params.pkl",
              "d8-k1-w1-s0_1_arch=d8-k1-w1,seed=0_2026-01-01_00-00-00/error.pkl")


def results_folder(tmp_path: Path) -> Path:
    """A signed results folder of the smoke study: its state, Tune's files (innocent pickles
    and JSON), a trial's checkpoint."""
    import json
    import pickle

    from orchestrator.study.folder import STATE_FILE
    from orchestrator.trust import sign

    folder = tmp_path / "results" / "smoke"
    for name in TUNE_STATE:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(json.dumps({"trial_data": []}).encode() if
                                    name.endswith(".json") else pickle.dumps({"state": name}))
    (folder / "train-1" / "checkpoint_1").mkdir(parents=True)
    (folder / "train-1" / "checkpoint_1" / "checkpoint.pt").write_bytes(b"weights only")
    (folder / STATE_FILE).write_text(json.dumps({"parent_run_id": "r",
                                                 "config_hash": "0123456789abcdef",
                                                 "tracking_uri": "u", "experiment": "smoke"}))
    sign(folder)
    return folder


def resume(tmp_path: Path, *more: str) -> int:
    return sweep_main([str(Path(__file__).parent.parent / "search_spaces" / "smoke.yaml"),
                       "--storage-path", str(tmp_path / "results"), "--tracking-uri",
                       f"sqlite:///{tmp_path / 'mlflow.db'}", "--resume", *more])


@pytest.fixture
def state_key(tmp_path, monkeypatch):
    """A per-user key file outside the results folder (as ~/.config/multires/state.key)."""
    monkeypatch.delenv("MULTIRES_STATE_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.mark.parametrize("name", TUNE_STATE)
def test_planted_pickle_in_the_results_folder_is_refused_before_it_runs(name, tmp_path, capsys,
                                                                        state_key):
    """A pickle that runs code, put in place of any state file Ray would unpickle (in a pickle
    or embedded in Tune's JSON, as Tune's encoder writes objects): the resume stops in one line
    naming the file before Ray starts; nothing ran. (Unpickled, the same bytes do run.)"""
    import json
    import pickle

    from ray.tune.utils.serialization import TuneFunctionEncoder

    folder = results_folder(tmp_path)
    payload = RunsCode()
    payload.marker = tmp_path / "ran"
    planted = folder / name
    planted.write_bytes(json.dumps({"runner_data": payload}, cls=TuneFunctionEncoder).encode()
                        if name.endswith(".json") else pickle.dumps(payload))
    assert resume(tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {name} in {folder} was not written by a sweep of "
                                               f"yours"), err
    assert not payload.marker.exists()
    assert not (tmp_path / "mlflow.db").exists()
    from ray.tune.utils.serialization import _loads_with_cloudpickle  # what Tune reads it with

    (_loads_with_cloudpickle if name.endswith(".json") else pickle.loads)(planted.read_bytes())
    assert payload.marker.exists()


def replaced_by(path: Path, make) -> None:
    path.unlink()
    make(path)


def changed_signatures(path: Path) -> None:
    """Every signature of one file in the folder's signature file, one digit changed."""
    signed = json.loads(path.read_text())
    name = sorted(signed)[0]
    signed[name] = [("1" if s[0] == "0" else "0") + s[1:] for s in signed[name]]
    path.write_text(json.dumps(signed))

NOT_SIGNED = "was not written by a sweep of yours"
LINKED = "is a symbolic link (Ray would read what it points to, which no signature covers)"
NOT_REGULAR = ("smoke is not a regular file (a pipe, a socket or a device: Ray would block "
               "reading it")
# A signed results folder, changed: each is refused by the check before a resume, in one line
# (never a hang, never an internal error).
CHANGES = {
    "another key": (lambda f, m: m.setenv("MULTIRES_STATE_KEY", "someone else's key"),
                    NOT_SIGNED),
    "no signatures": (lambda f, m: (f / "multires_signatures.json").unlink(), NOT_SIGNED),
    "a new pickle": (lambda f, m: (f / "callback-states-2026.pkl").write_bytes(b"\x80\x04N."),
                     NOT_SIGNED),
    # a signed file copied over another of the folder's names
    "signed for another name": (
        lambda f, m: (f / "tuner.pkl").write_bytes((f / TUNE_STATE[2]).read_bytes()), NOT_SIGNED),
    "a pipe in place of a pickle (it could feed Ray one)": (
        lambda f, m: replaced_by(f / "tuner.pkl", os.mkfifo), NOT_REGULAR),
    "a pickle linked to /dev/zero": (
        lambda f, m: replaced_by(f / "tuner.pkl", lambda p: p.symlink_to("/dev/zero")), LINKED),
    # a link to a file outside, signed there as the folder's: what it points to can change
    "a pickle linked to one outside the folder": (
        lambda f, m: [(f.parent / "elsewhere.pkl").write_bytes((f / "tuner.pkl").read_bytes()),
                      replaced_by(f / "tuner.pkl", lambda p: p.symlink_to(f.parent /
                                                                          "elsewhere.pkl"))],
        LINKED),
    # two links to `.` (a folder walked through its links never ends: 5.7 GB, then a hang)
    "links to the folder itself": (
        lambda f, m: [(f / name).symlink_to(".") for name in ("a", "b")], LINKED),
    "a trial folder linked to another": (
        lambda f, m: (f / "trial-copy").symlink_to(next(f.glob("d8-*"))), LINKED),
    "a signature changed": (lambda f, m: changed_signatures(f / "multires_signatures.json"),
                            NOT_SIGNED),
    "signatures that are not strings": (
        lambda f, m: (f / "multires_signatures.json").write_text('{"tuner.pkl": 1}'), NOT_SIGNED),
    "signatures a list": (lambda f, m: (f / "multires_signatures.json").write_text("[1, 2]"),
                          NOT_SIGNED),
    "signatures a pipe": (lambda f, m: replaced_by(f / "multires_signatures.json", os.mkfifo),
                          NOT_SIGNED),
    "signatures not UTF-8": (
        lambda f, m: (f / "multires_signatures.json").write_bytes(b"{\"\xff\": 1}"), NOT_SIGNED),
}


@pytest.mark.parametrize("change", CHANGES)
def test_results_signed_otherwise_are_refused(change, tmp_path, monkeypatch, state_key):
    from orchestrator.trust import check

    folder = results_folder(tmp_path)
    check(folder)  # as signed: accepted
    damage, message = CHANGES[change]
    damage(folder, monkeypatch)
    with pytest.raises(ConfigError) as error:
        check(folder)
    assert message in str(error.value)


def test_a_state_key_that_is_a_pipe_is_refused(tmp_path, state_key):
    from orchestrator.trust import key_file, state_key as read_key

    read_key(create=True)
    replaced_by(key_file(), os.mkfifo)
    with pytest.raises(ConfigError, match="the state key .*state.key is not a regular file "
                                          ".*; remove it .a new one is made. or set "
                                          "MULTIRES_STATE_KEY"):
        read_key(create=False)


# A state key that cannot be trusted to sign: refused in one line when it is read, which a
# sweep does before Ray starts (a key that fails only at the end leaves a folder trained but
# neither signed nor resumable).
BAD_KEYS = {
    "MULTIRES_STATE_KEY set but empty": (
        lambda path, m: m.setenv("MULTIRES_STATE_KEY", ""),
        "MULTIRES_STATE_KEY is set but empty; unset it"),
    "an empty key file (what a full disk leaves)": (
        lambda path, m: path.write_bytes(b""),
        "state.key holds 0 characters, not a key (a full disk, or edited); remove it (a new one "
        "is made; folders signed with it then need --trust-results) or set MULTIRES_STATE_KEY"),
    "a key file cut short": (lambda path, m: path.write_bytes(path.read_bytes()[:7]),
                             "state.key holds 7 characters, not a key"),
    "a key file others may read": (lambda path, m: path.chmod(0o644),
                                   "state.key is a link, another user's, or open to others "
                                   "(mode 644)"),
    "a key file others may write": (lambda path, m: path.chmod(0o620), "(mode 620)"),
    "a key file that is a link": (
        lambda path, m: [(path.parent / "k").write_bytes(path.read_bytes()),
                         (path.parent / "k").chmod(0o600),
                         replaced_by(path, lambda p: p.symlink_to(path.parent / "k"))],
        "is a link, another user's"),
}


@pytest.mark.parametrize("case", BAD_KEYS)
def test_a_state_key_that_cannot_sign_is_refused(case, tmp_path, monkeypatch, state_key):
    from orchestrator.trust import key_file, state_key as read_key

    assert len(read_key(create=True)) == 64
    damage, message = BAD_KEYS[case]
    damage(key_file(), monkeypatch)
    with pytest.raises(ConfigError) as error:
        read_key(create=True)
    assert message in str(error.value)


def test_a_sweep_with_an_empty_key_stops_before_ray_and_runs_once_it_is_removed(
        tmp_path, capsys, state_key, monkeypatch):
    """The key is read before Ray starts: nothing is written; removed, a new one is made."""
    from orchestrator.trust import key_file, state_key as read_key

    read_key(create=True)
    key_file().write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert sweep_main([str(Path(__file__).parent.parent / "search_spaces" / "smoke.yaml"),
                       "--storage-path", str(tmp_path / "results"), "--tracking-uri",
                       f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "state.key holds 0 characters, not a key" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config"]
    key_file().unlink()
    assert len(read_key(create=True)) == 64 and key_file().stat().st_mode & 0o077 == 0


def test_trust_results_signs_a_folder_and_the_key_stays_outside(tmp_path, state_key):
    from orchestrator.trust import SIGNATURES, check, key_file

    folder = results_folder(tmp_path)
    (folder / SIGNATURES).unlink()
    (folder / "tuner.pkl").write_bytes(b"not a pickle")  # fails later, in Ray: not our check
    import orchestrator.study.runner as sweep

    sweep.check_results(folder, trust=True)
    check(folder)
    assert key_file().stat().st_mode & 0o077 == 0  # readable by its user only
    assert not any(key_file().read_bytes() in p.read_bytes() for p in folder.rglob("*")
                   if p.is_file())


def test_a_pickle_planted_before_the_first_sweep_is_refused_never_signed(tmp_path, capsys,
                                                                          state_key):
    """results/STUDY/ holds a pickle before the study ever ran there: the sweep stops before
    Ray starts, naming it; nothing is signed, nothing ran."""
    import pickle

    from orchestrator.trust import SIGNATURES

    folder = tmp_path / "results" / "smoke"
    folder.mkdir(parents=True)
    payload = RunsCode()
    payload.marker = tmp_path / "ran"
    (folder / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(pickle.dumps(payload))
    code = sweep_main([str(Path(__file__).parent.parent / "search_spaces" / "smoke.yaml"),
                       "--storage-path", str(tmp_path / "results"), "--tracking-uri",
                       f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(
        f"error: searcher-state-2026-01-01_00-00-00.pkl in {folder} was not written by a sweep "
        f"of this study"), err
    assert not (folder / SIGNATURES).exists() and not payload.marker.exists()


def staged_state(folder: Path, version: int) -> None:
    """Tune's staging folder as it writes it: its state files (version `version`) and a trial's
    result."""
    import pickle

    for name in TUNE_STATE:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(pickle.dumps({"state": name, "version": version}))
    (folder / TUNE_STATE[-1]).with_name("result.json").write_text(f'{{"epoch": {version}}}')
    # Tune's restore copies the folder's JSON files into its staging folder, ours among them.
    (folder / "multires_signatures.json").write_text("{}")


def upload(staging: Path, results: Path) -> None:
    import pyarrow.fs

    from orchestrator.trust import signed_upload, state_key as read_key

    signed_upload(str(staging), pyarrow.fs.LocalFileSystem(), str(results), place=str(results),
                  key=read_key(create=True))


def test_tunes_copies_leave_signed_files_wherever_the_driver_is_killed(tmp_path, state_key):
    """Tune's copy of its state into the results folder, killed after each file it writes (a
    kill -9 of the driver at any moment of a save): every file there is signed and whole, the
    old version or the new one, and the resume accepts the folder."""
    import pickle
    import shutil

    from orchestrator.trust import check

    staging, before = tmp_path / "staging", tmp_path / "before"
    staged_state(staging, 1)
    upload(staging, before)
    (before / "multires_study.json").write_text("{}")
    staged_state(staging, 2)
    writes = len(TUNE_STATE) + 1 + 1  # the signatures, then each file
    for killed_after in range(writes + 1):
        results = tmp_path / f"killed-{killed_after}"
        shutil.copytree(before, results)
        done = []

        def replace(src, dst, real=os.replace):
            if len(done) == killed_after:
                raise KeyboardInterrupt  # the process ends here
            done.append(dst)
            real(src, dst)

        with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt) if \
                killed_after < writes else contextlib.nullcontext():
            patch.setattr(os, "replace", replace)
            upload(staging, results)
        assert check(str(results)), killed_after
        versions = {pickle.loads((results / n).read_bytes())["version"] for n in TUNE_STATE}
        assert versions <= {1, 2} and (killed_after < writes or versions == {2})


def test_a_planted_file_is_never_signed_by_tunes_copies(tmp_path, state_key):
    """A pickle planted in the results folder while the study runs stays unsigned however often
    Tune copies its own files there: the resume refuses it."""
    from orchestrator.trust import check

    staging, results = tmp_path / "staging", tmp_path / "results"
    staged_state(staging, 1)
    results.mkdir()
    (results / "evil.pkl").write_bytes(b"planted")
    upload(staging, results)
    upload(staging, results)
    with pytest.raises(ConfigError, match="evil.pkl in .* was not written by a sweep of yours"):
        check(str(results))


def test_a_tuner_file_killed_before_its_signing_is_a_fresh_start(tmp_path, state_key):
    """Only the Tuner's own file, unsigned (the driver was killed as Tuner() had just written
    it), or signed without Tune's saved state: nothing to restore, no refusal; once Tune's
    state is there and signed, the study is restored."""
    from orchestrator.trust import TUNER_STATE, check, sign

    (tmp_path / TUNER_STATE).write_bytes(b"written by Tuner()")
    assert check(str(tmp_path)) is False
    sign(str(tmp_path), only=(TUNER_STATE,))
    assert check(str(tmp_path)) is False
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    with pytest.raises(ConfigError, match="experiment_state"):
        check(str(tmp_path))
    sign(str(tmp_path))
    assert check(str(tmp_path)) is True
