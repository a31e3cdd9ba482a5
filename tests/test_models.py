"""Multi-ResNet architecture: exact parameter counts, shapes, init, and the fused execution form."""
import copy
import json
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from models.blocks import MultiResidualBlock, ResidualFunctions, TypeAShortcut, set_fused
from models.multi_resnet import Architecture, count_parameters, create_model
from models.architecture import parameter_count
from models.complexity import summarize
from orchestrator.commands.summary import main as summary_main

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("fields, expected", [
    # The five counts the paper and its code give (CIFAR-10 heads).
    (dict(depth=110, k=1), 1_727_962),
    (dict(depth=14, k=10), 1_713_018),
    (dict(depth=20, k=4), 1_074_874),
    (dict(depth=200, k=5, block="bottleneck"), 10_187_354),
    (dict(depth=26, k=2, width=10), 72_690_714),
    # Table II's pairs (0.29M, 1.0M, 1.7M) and Table I's depth-8 k=23 net.
    (dict(blocks=(4, 4, 3), k=1), 292_954),
    (dict(depth=8, k=4), 297_146),
    (dict(depth=68, k=1), 1_047_450),
    (dict(blocks=(5, 4, 5), k=4), 1_778_362),
    (dict(depth=8, k=23), 1_702_234),
])
def test_parameter_counts(fields, expected):
    with torch.device("meta"):
        model = create_model(**fields)
    assert count_parameters(model) == expected
    assert parameter_count(Architecture(**fields)) == expected  # what studies count without torch


def basic_cifar_count(n: int, k: int) -> int:
    """Closed form for basic CIFAR nets, width 1, shortcut A, written from the paper's design."""
    total = 3 * 16 * 9  # stem
    cin = 16
    for c in (16, 32, 64):
        total += 2 * cin + k * (cin * c * 9 + 2 * c + c * c * 9)  # first block: shared BN
        total += (n - 1) * k * (2 * c + c * c * 9 + 2 * c + c * c * 9)
        cin = c
    return total + 2 * 64 + 64 * 10 + 10  # final BN and linear head


@pytest.mark.parametrize("n, k", [(1, 1), (3, 1), (3, 4), (5, 2), (18, 3), (2, 7)])
def test_parameter_counts_match_closed_form(n, k):
    with torch.device("meta"):
        assert count_parameters(create_model(depth=6 * n + 2, k=k)) == basic_cifar_count(n, k)


def test_cifar100_head_and_pre_resnet_164():
    # pre-resnet-164 (bottleneck, 1.7M) of He et al.'s identity-mappings paper, CIFAR-100 head.
    arch = Architecture(depth=164, k=1, block="bottleneck", dataset="cifar100")
    c10 = Architecture(depth=164, k=1, block="bottleneck")
    assert summarize(arch)["params"] - summarize(c10)["params"] == 90 * 256 + 90
    assert round(summarize(c10)["params"] / 1e6, 1) == 1.7


def test_k_functions_multiply_block_parameters():
    """Adding functions adds exactly k-1 copies of every function's parameters."""
    one, four = create_model(depth=20, k=1), create_model(depth=20, k=4)
    fn_params = sum(count_parameters(b.functions) for b in one.blocks.values())
    assert count_parameters(four) - count_parameters(one) == 3 * fn_params


@pytest.mark.parametrize("fields, size, classes", [
    (dict(depth=20, k=2), 32, 10),
    (dict(depth=29, k=2, block="bottleneck"), 32, 10),
    (dict(depth=14, k=2, width=4), 32, 100),
    (dict(depth=20, k=3, shortcut="B"), 32, 10),
    (dict(depth=20, k=2, block="bottleneck", shortcut="A"), 32, 10),
    (dict(blocks=(1, 2, 1), k=2), 32, 10),
])
def test_cifar_shapes(fields, size, classes):
    dataset = "cifar100" if classes == 100 else "cifar10"
    model = create_model(dataset=dataset, **fields)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, classes)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152, 200])
def test_imagenet_shapes(depth):
    with torch.device("meta"):
        model = create_model(depth=depth, k=2, dataset="imagenet")
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    widths = {18: 512, 34: 512}.get(depth, 2048)
    assert model.head[-1].in_features == widths


def test_imagenet_18_runs_on_small_images():
    model = create_model(depth=18, k=2, dataset="imagenet")
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_block_structure_follows_the_original_code():
    model = create_model(depth=20, k=3)
    blocks = list(model.blocks.values())
    assert len(blocks) == 9
    for i, block in enumerate(blocks):
        first_of_stage = i % 3 == 0
        # First block of each stage: one shared BN-ReLU; others: a BN-ReLU per function.
        assert isinstance(block.preact, nn.Identity) != first_of_stage
        for f in block.functions.values():
            assert hasattr(f, "bn1") != first_of_stage
            assert f.conv1.stride == ((2, 2) if first_of_stage and i > 0 else (1, 1))
            assert f.conv2.stride == (1, 1)
        assert len(block.functions) == 3
    assert isinstance(blocks[3].shortcut, TypeAShortcut)  # option A at the stage change
    bottleneck = create_model(depth=29, k=2, block="bottleneck")
    b3 = bottleneck.blocks["3"]
    assert b3.functions["0"].conv1.stride == (2, 2) and b3.functions["0"].conv2.stride == (1, 1)
    assert isinstance(b3.shortcut, nn.Conv2d) and b3.shortcut.kernel_size == (1, 1)
    imagenet = create_model(depth=50, k=2, dataset="imagenet")
    assert isinstance(imagenet.blocks["0"].preact, nn.Identity)  # the stem already activated it
    assert not hasattr(imagenet.blocks["0"].functions["0"], "bn1")
    assert imagenet.blocks["3"].functions["1"].conv2.stride == (2, 2)


def test_type_a_shortcut_subsamples_and_pads_with_zeros():
    x = torch.randn(2, 16, 8, 8)
    out = TypeAShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0


def test_initialisation_matches_the_original():
    torch.manual_seed(0)
    model = create_model(depth=26, k=2, width=4)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() > 20_000:
            expected = math.sqrt(2 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
            assert m.weight.std().item() == pytest.approx(expected, rel=0.05)
            assert m.weight.mean().abs().item() < 0.1 * expected
            assert m.bias is None
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)


@pytest.mark.parametrize("fields, message", [
    (dict(depth=21), r"depth must be 6n\+2"),
    (dict(depth=23, block="bottleneck"), r"depth must be 9n\+2"),
    (dict(depth=20, k=0), "greater than or equal to 1"),
    (dict(depth=20, blocks=(4, 4, 3)), "disagrees with blocks"),
    (dict(blocks=(4, 4)), "three positive counts"),
    (dict(depth=20, dataset="imagenet"), "must be one of"),
    (dict(), "give depth or blocks"),
    (dict(depth=20, colour="red"), "Extra inputs"),
])
def test_invalid_architectures_name_the_problem(fields, message):
    with pytest.raises(ValidationError, match=message):
        Architecture(**fields)


# ----------------------------------------------------------------------------- fused form

def randomise(model: nn.Module) -> nn.Module:
    """Random BN affines and running statistics, so equal BNs cannot hide a mix-up."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


FUSED_CASES = [
    dict(depth=8, k=2),
    dict(depth=14, k=3),
    dict(depth=8, k=5, width=2),
    dict(depth=11, k=3, block="bottleneck"),
    dict(depth=20, k=2, block="bottleneck", width=2),
    dict(blocks=(1, 2, 1), k=4, shortcut="B"),
]


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x.to(next(model.parameters()).dtype))
    model.zero_grad()
    nn.functional.cross_entropy(out, y).backward()
    return out.detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fields", FUSED_CASES, ids=lambda f: Architecture(**f).name)
def test_fused_matches_reference_in_float64(fields, device):
    """Same function: forward, every gradient, BN running statistics, the parameters after two
    SGD steps, and evaluation mode, to float64 rounding."""
    torch.manual_seed(1)
    ref = randomise(create_model(**fields)).to(device, torch.float64)
    fused = set_fused(copy.deepcopy(ref), True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
            for m in (ref, fused)]
    x = torch.randn(16, 3, 32, 32, device=device, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), device=device)

    def close(a, b):
        assert torch.linalg.vector_norm(a - b) <= 1e-10 * max(torch.linalg.vector_norm(a), 1e-6)

    for _ in range(2):
        close(forward_backward(ref, x, y), forward_backward(fused, x, y))
        for p, q in zip(ref.parameters(), fused.parameters()):
            close(p.grad, q.grad)
        for a, b in zip(ref.buffers(), fused.buffers()):
            close(a.double(), b.double())  # running statistics and batch counters
        for opt in opts:
            opt.step()
        for p, q in zip(ref.parameters(), fused.parameters()):
            close(p.detach(), q.detach())
    ref.eval(), fused.eval()
    with torch.no_grad():
        close(ref(x), fused(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fields", FUSED_CASES, ids=lambda f: Architecture(**f).name)
def test_fused_agrees_with_reference_in_float32(fields, device, monkeypatch):
    """Both float32 forms against the float64 result. Outputs agree to float32 rounding (1e-5).
    A gradient can move more: an element that rounds across zero flips a ReLU mask, which the
    loop form suffers as much as the fused one (up to ~5e-3 measured, on either form); a wrong
    computation shows errors of order 1."""
    if device == "cuda":  # TF32 (cuDNN's default) keeps 10 mantissa bits: compare true float32
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
    torch.manual_seed(1)
    truth = randomise(create_model(**fields)).to(device, torch.float64)
    ref = copy.deepcopy(truth).float()
    fused = set_fused(copy.deepcopy(ref), True)
    x = torch.randn(16, 3, 32, 32, device=device, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), device=device)
    exact, *approx = [forward_backward(m, x, y).double() for m in (truth, ref, fused)]

    def rel(a, b):
        return (torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b)).item()

    assert max(rel(a, exact) for a in approx) < 1e-5
    errors = [max(rel(q.grad, p.grad), rel(r.grad, p.grad))
              for p, q, r in zip(truth.parameters(), ref.parameters(), fused.parameters())]
    assert max(errors) < 2e-2


def test_state_dicts_load_into_either_form():
    ref = randomise(create_model(depth=14, k=3))
    fused = set_fused(create_model(depth=14, k=3), True)
    assert ref.state_dict().keys() == fused.state_dict().keys()
    fused.load_state_dict(ref.state_dict())
    back = create_model(depth=14, k=3)
    back.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 32, 32)
    ref.eval(), fused.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
        assert torch.equal(back(x), ref(x))


def test_functions_can_be_removed_from_outside():
    """Branch sharding deletes functions a rank does not own; names and the sum stay right."""
    torch.manual_seed(0)
    model = randomise(create_model(depth=8, k=5)).eval()
    block = model.blocks["1"]
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        full = block.functions(x)
        keep = copy.deepcopy(block.functions)
        for key in ("0", "1", "2"):
            del keep[key]
        rest = copy.deepcopy(block.functions)
        for key in ("3", "4"):
            del rest[key]
        for fused in (False, True):
            keep.fused = rest.fused = fused
            torch.testing.assert_close(keep(x) + rest(x), full, rtol=1e-5, atol=1e-5)
    assert sorted(keep.state_dict().keys())[0].startswith("3.")
    assert ResidualFunctions([])(x) is None
    empty = MultiResidualBlock([], nn.Identity(), None)
    assert torch.equal(empty(x), x)


def test_summary_cli(capsys):
    assert summary_main(["--depth", "110", "--k", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 1_727_962
    assert info["blocks"] == [18, 18, 18] and info["shortcut"] == "A"
    assert summary_main(["--depth", "26", "--k", "2", "--width", "10"]) == 0
    text = capsys.readouterr().out
    assert "72,690,714" in text and "GFLOPs" in text
    assert summary_main(["--depth", "21"]) == 2
    assert capsys.readouterr().err == ("error: depth must be 6n+2 for basic blocks (e.g. 20), "
                                       "got 21\n")


@pytest.mark.parametrize("fields", [dict(depth=8, k=3), dict(depth=11, k=2, block="bottleneck"),
                                    dict(depth=14, k=2, width=2)])
def test_flops_equal_an_independent_count(fields):
    """torch's flop counter against multiply-adds counted from conv and linear shapes."""
    model = create_model(**fields).eval()
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs.append(output.numel() * module.in_channels // module.groups * kh * kw)
        else:
            macs.append(module.in_features * module.out_features)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    model(torch.randn(1, 3, 32, 32))
    assert summarize(Architecture(**fields))["flops"] == 2 * sum(macs)


@pytest.mark.parametrize("fields", [
    dict(depth=110, k=1), dict(depth=56, k=3, width=2), dict(blocks=(5, 4, 5), k=4),
    dict(depth=29, k=2, block="bottleneck"), dict(depth=20, k=3, shortcut="B"),
    dict(blocks=(2, 3, 1), k=5, width=4, shortcut="A"), dict(blocks=(1, 1, 1), k=2, width=2),
    dict(depth=164, k=1, block="bottleneck", dataset="cifar100"),
    dict(depth=47, k=3, width=2, block="bottleneck", shortcut="A"),
    dict(depth=18, k=3, dataset="imagenet", classes=37), dict(depth=50, k=2, dataset="imagenet"),
])
def test_parameter_count_from_the_architecture_equals_the_built_network(fields):
    """Studies count hundreds of architectures without torch; the count must be the built
    network's, for every block kind, shortcut, width and variant."""
    arch = Architecture(**fields)
    with torch.device("meta"):
        assert parameter_count(arch) == count_parameters(create_model(arch))
