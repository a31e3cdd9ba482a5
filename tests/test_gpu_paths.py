"""CUDA-only paths checked on a CPU: what they decide and in which order they call CUDA, with
the CUDA calls faked or recorded (placement, RNG state on resume, precision, stream order,
static compiled blocks, sizes from the trial's own CPUs, layouts kept by branch collectives)."""
import os
import sys
import types

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from orchestrator.errors import ConfigError
from orchestrator.run import cpus, images
from orchestrator.run.config import TrainConfig
from orchestrator.study.config import StudyConfig
from tests.images import write_image_folder

CIFAR_NORM = ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))
STUDY = dict(name="s", space={"depth": 8}, train={"dataset": "synthetic"})


def test_fractional_gpus_are_refused_for_multi_rank_trials():
    with pytest.raises(ValueError, match="resources.gpus_per_worker: 0.5 with 2 ranks per trial; "
                                         "NCCL needs a whole GPU per rank"):
        StudyConfig(**STUDY, parallel={"dp": 2}, resources={"gpus_per_worker": 0.5})
    StudyConfig(**STUDY, resources={"gpus_per_worker": 0.5})  # one rank: trials share a GPU
    StudyConfig(**STUDY, parallel={"dp": 2}, resources={"gpus_per_worker": 1})


def test_workers_given_no_gpu_train_on_the_cpu(monkeypatch, tmp_path):
    """Ray 2.60 no longer hides the GPUs from a worker given none: device auto would put every
    rank on cuda:0. A device-cuda mesh with too few GPUs is refused before anything starts."""
    from orchestrator.cluster import driver

    cfg = TrainConfig(architecture=dict(depth=8, k=2), dataset="synthetic", parallel={"bp": 2})
    trainer = driver.build_trainer(cfg, name="t", storage_path=str(tmp_path), echo=False,
                                   gpus_per_worker=0)
    assert cfg.device == "auto" and trainer.train_loop_config["run"]["device"] == "cpu"
    monkeypatch.setattr(driver, "init_ray", lambda: None)
    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"CPU": 16, "GPU": 1})
    with pytest.raises(ConfigError, match="device cuda: 2 ranks need a GPU each and the cluster "
                                          "has 1; use device auto or cpu"):
        driver.run_on_ray(cfg.model_copy(update={"device": "cuda"}))


def test_the_process_groups_backend_does_on_gpus_what_ray_trains_torch_backend_does(monkeypatch):
    """The project's backend (torch-free where Ray Train's controller loads it) keeps what Ray's
    own torch backend does beyond the rendezvous: a node's ranks see its GPUs, each rank's CUDA
    device is set around the training function, and the group is destroyed and each device's
    cache emptied at the end; Ray's run state calls it torch."""
    import ray.train.torch
    import ray.train.torch.config as ray_torch

    from orchestrator.cluster import driver

    assert driver.ScopedTorchBackend.share_cuda_visible_devices is \
        ray_torch._TorchBackend.share_cuda_visible_devices is True
    assert driver.ScopedTorchConfig().framework == ray_torch.TorchConfig().framework
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    with driver.ScopedTorchConfig().train_func_context():
        assert set_to == [torch.device("cuda", 1)]

    ended = []
    monkeypatch.setattr(ray_torch, "_shutdown_torch", lambda **kw: ended.append(kw))
    monkeypatch.setattr(driver.ray, "get", lambda done, timeout: done)

    class TwoRanks:
        def __len__(self):
            return 2

        def execute_async(self, fn, *args, **kwargs):
            return [fn(*args, **kwargs) for _ in range(2)]

    driver.ScopedTorchBackend().on_shutdown(TwoRanks(), driver.ScopedTorchConfig())
    assert ended == [{"destroy_process_group": True}] * 2


def test_a_slow_worker_start_is_waited_for_unless_the_user_says_otherwise(monkeypatch, tmp_path):
    """Ray Train's 60 s for a worker group to start is raised (under load a start took longer,
    and the trial restarted its workers again and again); a value the user set is kept."""
    from orchestrator.cluster import driver

    cfg = TrainConfig(architecture=dict(depth=8, k=1), dataset="synthetic")
    name, _ = driver.WORKER_GROUP_START_TIMEOUT
    monkeypatch.delenv(name, raising=False)
    driver.build_trainer(cfg, name="t", storage_path=str(tmp_path), echo=False)
    assert float(os.environ[name]) >= 300
    monkeypatch.setenv(name, "42")
    driver.build_trainer(cfg, name="t", storage_path=str(tmp_path), echo=False)
    assert os.environ[name] == "42"


def test_a_checkpoint_from_more_gpus_resumes_where_fewer_are_visible(monkeypatch):
    """States saved by a process that saw two GPUs, restored in one that sees one (the CUDA
    RNG is unused: models are initialised on the CPU, the data draws use CPU generators)."""
    from orchestrator.run import loop

    restored = []

    def set_state(state, device="cuda"):
        if device not in ("cuda", 0):
            raise RuntimeError("CUDA error: invalid device ordinal")
        restored.append(state)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)
    mine, other = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": mine)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [mine, other])
    assert loop.rng_state()["cuda"] is mine  # this process's GPU only
    loop.set_rng_state({"torch": torch.get_rng_state(), "cuda": [mine, other]})  # older layout
    loop.set_rng_state(loop.rng_state())
    assert restored == [mine, mine]


@pytest.mark.parametrize("capability, precision", [((7, 0), "fp16"), ((7, 5), "fp16"),
                                                   ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_auto_uses_bf16_only_where_the_gpu_computes_it(monkeypatch, capability,
                                                                 precision):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert TrainConfig().resolved(cuda_available=True).precision == precision
    assert TrainConfig(precision="bf16").resolved(cuda_available=True).precision == "bf16"


def test_branch_collectives_keep_channels_last():
    from orchestrator.parallel.branch import _CopyToBranches, _ReduceFromBranches

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
        y = _ReduceFromBranches.apply(_CopyToBranches.apply(x, group) * 2, group)
        y.backward(torch.ones_like(y))
    finally:
        dist.destroy_process_group()
    for t in (y, x.grad):
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    assert torch.equal(y, 2 * x) and torch.equal(x.grad, torch.full_like(x, 2))


def test_system_metrics_read_the_workers_own_gpu(monkeypatch):
    from orchestrator.cluster.system_metrics import SystemSampler

    asked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: asked.append(d) or types.SimpleNamespace(total_memory=2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: asked.append(d) or 2**29)
    monkeypatch.setattr(torch.cuda, "utilization", lambda d: asked.append(d) or 40)
    sampler = SystemSampler(gpu=True, interval_s=3600)
    try:
        sample = sampler.sample()
    finally:
        sampler.close()
    assert asked == [1, 1, 1] and sample["gpu_0_memory_usage_percentage"] == 50


def test_compiled_blocks_are_static_graphs():
    """Regional compilation of a 3-stage net: every graph dynamo hands the backend has
    static shapes (automatic dynamic shapes would mark later stages' H and W symbolic)."""
    from models.multi_resnet import create_model
    from orchestrator.run.config import TrainConfig
    from orchestrator.run.step import compile_blocks

    graphs = []

    def symbolic(value) -> bool:  # a size input (s0), or a tensor of symbolic shape
        return isinstance(value, torch.SymInt) or isinstance(value, torch.Tensor) and any(
            isinstance(size, torch.SymInt) for size in value.shape)

    def backend(gm, example_inputs):
        graphs.append(any(symbolic(value) for value in example_inputs))
        return gm.forward

    torch._dynamo.reset()
    model = create_model(TrainConfig(architecture=dict(depth=8, k=2)).architecture)
    try:
        assert compile_blocks(model, backend=backend) == 3
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    finally:
        torch._dynamo.reset()
    assert len(graphs) >= 3 and not any(graphs)


@pytest.fixture
def ray_worker(monkeypatch):
    """This process as a Ray worker assigned 4 CPUs on a larger node."""
    import orchestrator.cluster.worker  # noqa: F401  (imports the real ray first)

    context = types.SimpleNamespace(get_assigned_resources=lambda: {"CPU": 4.0, "GPU": 1.0})
    fake = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(128)))


def test_data_and_compile_workers_follow_the_trials_cpus(ray_worker, monkeypatch):
    from orchestrator.cluster.worker import limit_compile_threads

    assert cpus.default_workers() == 3  # not 127: the node's cores are every trial's
    # A stand-in for inductor's process-wide config: patching the real one here preceded a later
    # compile in the same process failing with "compile_threads does not exist".
    inductor = types.SimpleNamespace(compile_threads=32)
    monkeypatch.setitem(sys.modules, "torch._inductor.config", inductor)
    limit_compile_threads()
    assert inductor.compile_threads == 4
    # Where inductor is not imported yet, the worker does not import it (seconds of every trial
    # process) but sets the variable inductor reads when it is.
    monkeypatch.delitem(sys.modules, "torch._inductor.config")
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    limit_compile_threads()
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "4"
    assert "torch._inductor.config" not in sys.modules


def test_device_decoding_runs_on_a_side_stream_ordered_with_the_current_one(monkeypatch):
    """nvJPEG writes from its own stream without waiting for the caller's: the decode runs on a
    side stream that waits for the current one; the current one then waits for it, and the
    outputs are recorded on it (pytorch/vision#9606)."""
    calls = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            calls.append(f"{self.name} waits for {other.name}")

    class Image_:
        def record_stream(self, stream):
            calls.append(f"output recorded on {stream.name}")

    current, on = Stream("current"), []

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            on.append(self.stream)
            calls.append(f"enter {self.stream.name}")

        def __exit__(self, *exc):
            on.pop()
            calls.append(f"leave {self.stream.name}")

    def decode(data, mode, device):
        calls.append(f"decode {len(data)} on {on[-1].name}")
        return [Image_() for _ in data]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream("side"))
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(images, "decode_jpeg", decode)
    images.side_stream.cache_clear()
    try:
        out = images.decode_in_order([torch.zeros(4)] * 2, torch.device("cuda", 0))
    finally:
        images.side_stream.cache_clear()
    assert len(out) == 2 and calls == [
        "side waits for current", "enter side", "decode 2 on side", "leave side",
        "current waits for side", "output recorded on current", "output recorded on current"]


def test_a_truncated_jpeg_goes_to_the_workers(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(path, quality=90)
    data = path.read_bytes()
    assert images.jpeg_size(data) == (40, 30)
    assert images.jpeg_size(data[:-200]) is None  # header whole, data cut short


def test_device_batches_pass_pin_memory_and_worker_batches_may_become_lists(tmp_path,
                                                                             monkeypatch):
    """pin_memory leaves a `decode: device` batch as it is; torch before 2.10 turned the
    workers' tuples into lists, which must still be read as decoded batches."""
    from torch.utils.data._utils.pin_memory import pin_memory

    train, _ = images.load_folder(write_image_folder(tmp_path / "f", train=4, val=1))
    todo = images.ToDecode([("encoded", 0, (), None)])
    assert pin_memory(todo) is todo

    def batches(loader_as):
        b = images.FolderBatches(train, "cifar", 32, *CIFAR_NORM, batch_size=4, device="cpu",
                                 train=True, seed=1, workers=0)
        loader = b.loader
        monkeypatch.setattr(b, "loader", lambda *a: [loader_as(x) for x in loader(*a)])
        return list(b.epoch(0))

    for (x, y), (xl, yl) in zip(batches(tuple), batches(list), strict=True):
        assert torch.equal(x, xl) and torch.equal(y, yl)
