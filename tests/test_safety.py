"""Safety: a local Ray listens on loopback only; checkpoints and study files never run code."""
import ipaddress
import os
import threading
from pathlib import Path

import pytest
import torch

from orchestrator.errors import CheckpointError
from orchestrator.run.checkpoint import load_checkpoint
from orchestrator.sweep import main as sweep_main


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
    from orchestrator.train import main as train_main

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
    assert "not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()
