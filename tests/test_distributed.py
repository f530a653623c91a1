"""Data-parallel training and synchronized batch norm, on the CPU with gloo.

The two-process tests start their own processes (torch.multiprocessing, spawn) and compare
what they compute with a single process over the concatenated batch, computed here."""

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from stopping import StopAt
from torch import nn

from resnorm import create_model
from resnorm.cli import _forwarded_args, main, train
from resnorm.data import DataSplit
from resnorm.norms import (
    BatchNorm,
    SyncBatchNorm,
    convert_sync_batchnorm,
    has_batch_norm,
    revert_sync_batchnorm,
)
from resnorm.train import TrainConfig, augment_images, fit
from resnorm.train.distributed import check_nproc, describe_failures
from resnorm.train.loop import _batches, _check_resumable, _shard
from resnorm.train.run import train_identity

WORLD = 2
PER_PROCESS_BATCH = 16


# ------------------------------------------------------------------ one process: conversion


class BatchNormReLU(BatchNorm):
    """A batch norm of the user's own that carries an activation."""

    def __init__(self, num_features, **options):
        super().__init__(num_features, **options)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class OwnForward(nn.BatchNorm1d):
    def forward(self, x):
        return super().forward(x) * 2


def _zoo():
    torch.manual_seed(0)
    model = nn.Sequential(
        BatchNorm(4, convention="keras", momentum=0.9, eps=1e-4, channel_dim=-1),
        nn.BatchNorm1d(4, momentum=None),
        nn.Sequential(BatchNormReLU(4, affine=False), nn.BatchNorm2d(4, eps=1e-3)),
        nn.BatchNorm3d(4, track_running_stats=False),
        nn.LayerNorm(4),
    )
    model[1].eval()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(7)
            if getattr(module, "weight", None) is not None:
                module.weight.normal_()
    return model


def _options(module):
    return {
        k: getattr(module, k, None)
        for k in (
            "num_features",
            "eps",
            "momentum",
            "affine",
            "track_running_stats",
            "convention",
            "channel_dim",
            "training",
        )
    }


def test_convert_keeps_tensors_options_and_subclasses_and_revert_restores_classes():
    model = _zoo()
    before = {name: (type(m), _options(m)) for name, m in model.named_modules()}
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hook_calls = []
    model[0].register_forward_hook(lambda *a: hook_calls.append(1))

    converted = convert_sync_batchnorm(model)
    assert converted is model  # in place: the container is kept, its batch norms replaced
    for name in ("0", "1", "2.0", "2.1", "3"):
        module = model.get_submodule(name)
        assert isinstance(module, SyncBatchNorm), name
        for key, value in before[name][1].items():
            if value is not None or key == "momentum":  # torch.nn's lack resnorm's layout options
                assert getattr(module, key) == value, (name, key)
    assert type(model.get_submodule("2.0")).__mro__[1:3] == (BatchNormReLU, SyncBatchNorm)
    assert isinstance(model.get_submodule("2.0").act, nn.ReLU)
    assert model[1].convention == "torch" and model[1].channel_dim == 1
    assert not model[1].training and model[0].training
    assert isinstance(model[4], nn.LayerNorm)
    # The same tensor objects: an optimizer built before the conversion keeps working.
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is tensors[name], name
    assert model.state_dict().keys() == state.keys()
    # Outside a process group it is exactly the plain layer, forward and running statistics.
    reference = _zoo()
    x = torch.randn(6, 4)
    for layer, twin in ((model[0], reference[0]), (model[1], reference[1])):
        assert torch.equal(layer(x), twin(x))
    assert hook_calls == [1]
    x4 = torch.randn(6, 4, 3, 2)
    assert torch.equal(model[2](x4), reference[2](x4))
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name

    reverted = revert_sync_batchnorm(model)
    assert reverted is model
    for name, m in model.named_modules():
        assert (type(m), _options(m)) == before[name], name
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is tensors[name], name
    assert not hasattr(model[1], "convention") and not hasattr(model[1], "process_group")
    model[0](x)
    assert hook_calls == [1, 1]  # hooks travel both ways


def test_convert_a_lone_batch_norm_and_refuse_what_would_lose_behaviour():
    bn = nn.BatchNorm2d(3)
    sync = convert_sync_batchnorm(bn)
    assert isinstance(sync, SyncBatchNorm) and sync.weight is bn.weight
    assert type(revert_sync_batchnorm(sync)) is nn.BatchNorm2d
    assert type(revert_sync_batchnorm(SyncBatchNorm(3))) is BatchNorm
    with pytest.raises(TypeError, match="OwnForward.*forward"):
        convert_sync_batchnorm(nn.Sequential(OwnForward(3)))
    with pytest.raises(TypeError, match="nn.Module"):
        convert_sync_batchnorm("model")
    assert has_batch_norm(create_model("mlp", in_features=8, num_classes=3, depth=1, width=8))
    assert not has_batch_norm(
        create_model("mlp", in_features=8, num_classes=3, depth=1, width=8, norm="layer")
    )


# ------------------------------------------------------------- one process: batches, checks


def test_global_batches_of_n_processes_are_those_of_one_process_with_n_times_the_batch():
    for n in (199, 200, 197, 35):
        one = _batches(n, 32, seed=3, epoch=1)
        two = _batches(n, 16, seed=3, epoch=1, world_size=2)
        shards = [[_shard(b, 2, r) for r in range(2)] for b in two]
        # Every kept batch splits into slices that concatenate back to it, each of >= 2.
        for batch, pair in zip(two, shards):
            assert torch.equal(torch.cat([p for p, _ in pair]), batch)
            assert pair[0][1] == 0 and pair[1][1] == len(pair[0][0])
            assert min(len(p) for p, _ in pair) >= 2
        # The same batches as one process, but a trailing batch that cannot give each
        # process 2 samples (n=197: 5 left, 3 + 2 fine; n=35: 3 left, dropped).
        expected = [b for b in one if len(b) == 32 or len(b) >= 4]
        assert len(two) == len(expected) and all(torch.equal(a, b) for a, b in zip(two, expected))
    assert len(_batches(35, 32, 0, 0)) == 2 and len(_batches(35, 16, 0, 0, world_size=2)) == 1


def test_augmenting_slices_equals_augmenting_the_whole_batch():
    x = torch.randn(7, 2, 6, 6)
    whole = augment_images(x, 2, torch.Generator().manual_seed(4))
    pieces = [
        augment_images(x[lo:hi], 2, torch.Generator().manual_seed(4), offset=lo, total=7)
        for lo, hi in ((0, 4), (4, 7))
    ]
    assert torch.equal(torch.cat(pieces), whole)
    with pytest.raises(ValueError, match="total=7"):
        augment_images(x[:4], 2, torch.Generator(), offset=5, total=7)


def test_resume_across_world_sizes_needs_the_same_global_batch(tmp_path):
    def identity(config, world_size):
        return {"train": train_identity(config.to_dict(), world_size)}

    state = {"config": TrainConfig(batch_size=16).to_dict(), "world_size": 2, "steps_per_epoch": 7}
    _check_resumable(state, identity(TrainConfig(batch_size=32), 1), 1, 7, tmp_path)  # 2x16 = 1x32
    with pytest.raises(
        ValueError,
        match=r"different configuration \(train.global_batch_size: "
        r"32 -> 16\)",
    ):
        _check_resumable(state, identity(TrainConfig(batch_size=16), 1), 1, 13, tmp_path)
    with pytest.raises(ValueError, match=r"different configuration \(train.lr: 0.003 -> 0.1\)"):
        _check_resumable(state, identity(TrainConfig(batch_size=32, lr=0.1), 1), 1, 7, tmp_path)
    with pytest.raises(ValueError, match="2 process.*7 steps per epoch.*give 13"):
        _check_resumable(state, identity(TrainConfig(batch_size=32), 1), 1, 13, tmp_path)
    old = {"config": {k: v for k, v in TrainConfig().to_dict().items() if k != "sync_bn"}}
    _check_resumable(old, identity(TrainConfig(), 1), 1, 7, tmp_path)  # before sync_bn existed


def test_check_nproc_and_failure_lines():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    assert check_nproc(1) == 1
    for bad in (0, (os.cpu_count() or 1) + 1):
        with pytest.raises(ValueError, match=f"nproc={bad} .*CPU cores"):
            check_nproc(bad)
    failures = {
        0: ProcessFailure(0, 100, -signal.SIGTERM, "<N/A>"),
        1: ProcessFailure(1, 101, -signal.SIGKILL, "<N/A>"),
    }
    failures[1].timestamp += 5  # noticed later, still the cause
    assert describe_failures(failures) == (
        "worker rank 1 (pid 101) was killed by SIGKILL; the other worker(s) were stopped (rank 0)"
    )
    assert (
        describe_failures({3: ProcessFailure(3, 7, 2, "<N/A>")})
        == "worker rank 3 (pid 7) exited with status 2"
    )


# ------------------------------------------------------------------ CLI: bad input, forwarding


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--model", "mlp", "--nproc", "0"], "--nproc"),
        (["train", "--model", "mlp", "--nproc", "100000"], "nproc=100000 is not possible here"),
        (
            ["train", "--model", "mlp", "--samples", "100", "--norm", "layer", "--sync-bn"],
            "has no batch norm",
        ),
        (["lab", "depth", "--nproc", "2", "--workers", "2"], "cannot be combined"),
        (["lab", "depth", "--nproc", "100000"], "nproc=100000 is not possible here"),
    ],
)
def test_distributed_bad_input_is_one_line_and_status_2(capsys, tmp_path, argv, fragment):
    code, out, err = _cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("resnorm: error:")
    assert fragment in err


def test_train_forwards_exactly_the_options_given_to_its_workers():
    argv = [
        "--model",
        "mlp",
        "--plain",
        "--lr",
        "0.0030000000000000001",
        "--nproc",
        "2",
        "--sync-bn",
        "-q",
        "--out",
        "runs/x",
        "--warmup-epochs",
        "0.1",
    ]
    ctx = train.make_context("train", list(argv))
    forwarded = _forwarded_args(ctx, drop=("nproc",))
    assert "--nproc" not in forwarded and "--dataset" not in forwarded  # defaults stay out
    again = train.make_context("train", forwarded)
    assert again.params == {**ctx.params, "nproc": 1}


# ------------------------------------------------------------------ two processes (gloo)


def _blobs(dtype):
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 8, generator=g)
    y = torch.randint(0, 3, (263,), generator=g)
    x = (centers[y] + torch.randn(263, 8, generator=g)).to(dtype)
    # 199 training samples: 6 global batches of 32 and a trailing 7, split 4 + 3.
    return DataSplit("blobs", x[:199], y[:199], x[199:], y[199:], 3)


def _model(norm, dtype):
    torch.manual_seed(1234)
    return create_model("mlp", in_features=8, num_classes=3, depth=2, width=16, norm=norm).to(dtype)


def _config(batch_size, sync_bn, **extra):
    # SGD: AdamW divides each gradient by its own running magnitude, which turns the
    # rounding noise of gradients that are exactly zero in theory (the bias of a linear
    # layer followed by batch norm) into +-lr steps, and a weight-by-weight comparison
    # into a comparison of noise.
    return TrainConfig(
        epochs=2, batch_size=batch_size, optimizer="sgd", lr=0.05, sync_bn=sync_bn, **extra
    )


TRAIN_CASES = {
    "batch-sync": ("batch", True),
    "layer": ("layer", False),
    "batch-nosync": ("batch", False),
}
DTYPES = {"float64": torch.float64, "float32": torch.float32}

# name: (convention, shape of one sample, channel_dim, slice sizes, options, dtype)
SBN_CASES = {
    "torch-2d-f32": ("torch", (5,), 1, (3, 5), {}, torch.float32),
    "torch-2d-f64": ("torch", (5,), 1, (3, 5), {}, torch.float64),
    "torch-3d-cumulative": ("torch", (5, 7), 1, (4, 2), {"momentum": None}, torch.float32),
    "keras-4d": ("keras", (5, 4, 3), 1, (3, 5), {}, torch.float32),
    "keras-4d-f64": ("keras", (5, 4, 3), 1, (3, 5), {}, torch.float64),
    "tokens-channels-last": ("torch", (6, 5), -1, (2, 3), {}, torch.float32),
    "no-affine-no-stats": (
        "torch",
        (5, 3),
        1,
        (3, 5),
        {"affine": False, "track_running_stats": False},
        torch.float32,
    ),
    "one-sample-slice": ("torch", (5,), 1, (1, 3), {}, torch.float32),
    "empty-slice": ("keras", (5, 2), 1, (0, 6), {}, torch.float64),
    "torch-nn-twin": ("nn", (5, 4, 4), 1, (5, 3), {}, torch.float32),
    # Mean 1000, std 3: float32 sums of squares would lose the variance (1e-2 off); ours
    # are as close to the float64 truth as one float32 process is (measured: 7e-6, 7e-6).
    "far-from-zero": ("torch", (5, 3), 1, (4, 4), {}, torch.float32),
}


def _sbn_setup(name, as_dtype=None):
    """The case's layer, two steps of (input, output gradient), and the slice sizes;
    ``as_dtype``: the same values, converted (a float64 reference of a float32 case)."""
    convention, sample, channel_dim, sizes, options, dtype = SBN_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    n = sum(sizes)
    mean = 1000.0 if name == "far-from-zero" else 2.0
    steps = [
        (
            (torch.randn(n, *sample, generator=g, dtype=torch.float64) * 3 + mean).to(dtype),
            torch.randn(n, *sample, generator=g, dtype=torch.float64).to(dtype),
        )
        for _ in range(2)
    ]
    channels = sample[channel_dim] if channel_dim == -1 else sample[0]
    if convention == "nn":
        layer = nn.BatchNorm2d(channels, dtype=dtype)
    else:
        layer = BatchNorm(
            channels, convention=convention, channel_dim=channel_dim, dtype=dtype, **options
        )
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=g)
            layer.bias.uniform_(-1, 1, generator=g)
    if as_dtype is not None:
        layer = layer.to(as_dtype)
        steps = [(x.to(as_dtype), dy.to(as_dtype)) for x, dy in steps]
    return layer, steps, sizes


def _sbn_run(layer, steps, lo, hi, reduce):
    """Two training steps of ``layer`` on rows lo:hi: outputs, input gradients, parameter
    gradients (``reduce``d over processes) and running statistics after each step."""
    record = []
    for x, dy in steps:
        xs = x[lo:hi].clone().requires_grad_()
        y = layer(xs)
        y.backward(dy[lo:hi])
        entry = {"y": y.detach(), "dx": xs.grad}
        for name in ("weight", "bias"):
            p = getattr(layer, name)
            if p is not None:
                entry["d" + name] = reduce(p.grad.clone())
                p.grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(layer, name) is not None:
                entry[name] = getattr(layer, name).clone()
        record.append(entry)
    return record


class _Stop(Exception):
    pass


def _worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )

    def reduce(t):
        dist.all_reduce(t)
        return t

    for name in SBN_CASES:  # synchronized batch norm, forward and backward
        layer, steps, sizes = _sbn_setup(name)
        layer = convert_sync_batchnorm(layer)
        lo = sum(sizes[:rank])
        torch.save(
            _sbn_run(layer, steps, lo, lo + sizes[rank], reduce), f"{out}/sbn-{name}-{rank}.pt"
        )
    layer, steps, _ = _sbn_setup("torch-2d-f32")
    try:  # one value per channel over both processes
        convert_sync_batchnorm(layer)(
            steps[0][0][rank : rank + 1] if rank == 0 else steps[0][0][:0]
        )
    except ValueError as exc:
        (out / f"one-value-{rank}.txt").write_text(str(exc))

    for dtype_name, dtype in DTYPES.items():  # DDP training
        for case, (norm, sync) in TRAIN_CASES.items():
            model = _model(norm, dtype)
            run = out / f"ddp-{dtype_name}-{case}" if case == "batch-sync" else None
            fit(model, _blobs(dtype), _config(PER_PROCESS_BATCH, sync), out=run, progress=False)
            if rank == 0:
                torch.save(model.state_dict(), out / f"ddp-{dtype_name}-{case}.pt")

    # Interrupted after step 6 (checkpoint at step 4), then resumed by 2 processes here and
    # by 1 process in the parent; and a 1-process checkpoint made by the parent resumed here.
    interrupted = out / "interrupted-2"
    with pytest.raises(_Stop):
        fit(
            _model("batch", torch.float64),
            _blobs(torch.float64),
            _config(PER_PROCESS_BATCH, True, checkpoint_every=4),
            out=interrupted,
            progress=False,
            monitor=StopAt(6, _Stop),
        )
    dist.barrier()
    if rank == 0:
        shutil.copytree(interrupted, out / "resume-2-by-1")
    dist.barrier()
    for source, run in ((interrupted, "resume-2-by-2"), (out / "interrupted-1", "resume-1-by-2")):
        model = _model("batch", torch.float64)
        result = fit(
            model,
            _blobs(torch.float64),
            _config(PER_PROCESS_BATCH, True, checkpoint_every=4),
            out=source,
            progress=False,
        )
        if rank == 0:
            torch.save(
                {"weights": model.state_dict(), "resumed": result.resumed_from_step},
                out / f"{run}.pt",
            )
    dist.barrier()
    dist.destroy_process_group()


def _single(norm, dtype, **fit_options):
    model = _model(norm, dtype)
    sync = norm == "batch"
    result = fit(
        model,
        _blobs(dtype),
        _config(WORLD * PER_PROCESS_BATCH, sync, checkpoint_every=fit_options.pop("every", None)),
        progress=False,
        **fit_options,
    )
    return model, result


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Everything the two processes compute, in one launch (starting processes is the
    expensive part): a folder of their results."""
    out = tmp_path_factory.mktemp("ddp")
    with pytest.raises(_Stop):  # a 1-process checkpoint (global batch 32) for them to resume
        _single(
            "batch", torch.float64, out=out / "interrupted-1", every=4, monitor=StopAt(6, _Stop)
        )
    context = mp.start_processes(
        _worker, args=(str(out / "store"), out), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two worker processes did not finish in 240 s")
    return out


def _max_error(actual, expected):
    """Largest absolute difference, relative to the largest entry (at least 1)."""
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    return (
        (actual.double() - expected.double()).abs().max().item() / scale
        if expected.numel()
        else 0.0
    )


@pytest.mark.parametrize("name", list(SBN_CASES))
def test_sync_batch_norm_over_two_processes_equals_one_process_over_the_whole_batch(
    two_processes, name
):
    exact = name == "far-from-zero"  # the float32 reference's own error is 7e-6 here
    layer, steps, sizes = _sbn_setup(name, torch.float64 if exact else None)
    reference = _sbn_run(layer, steps, 0, sum(sizes), lambda t: t)
    tolerance = 1e-12 if SBN_CASES[name][-1] == torch.float64 else 1e-5 if exact else 1e-6
    for rank in range(WORLD):
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        got = torch.load(two_processes / f"sbn-{name}-{rank}.pt", weights_only=True)
        for step, (mine, ref) in enumerate(zip(got, reference)):
            assert mine.keys() == ref.keys()
            for key in mine:
                expected = ref[key][lo:hi] if key in ("y", "dx") else ref[key]
                assert mine[key].shape == expected.shape, (key, step)
                if key == "num_batches_tracked":
                    assert torch.equal(mine[key], expected)
                else:
                    assert _max_error(mine[key], expected) <= tolerance, (key, step, rank)


def test_sync_batch_norm_refuses_one_value_per_channel_in_every_process(two_processes):
    for rank in range(WORLD):
        message = (two_processes / f"one-value-{rank}.txt").read_text()
        assert "more than one value per channel over all processes, got 1" in message


def _weights_error(got: dict, expected: dict) -> float:
    """The largest difference of any parameter or running statistic, relative to that
    tensor's largest entry (at least 1)."""
    return max(_max_error(got[k], v) for k, v in expected.items() if v.is_floating_point())


# float64 shows the algorithm is exact (measured: ~1e-14); float32 differs by rounding,
# which 14 steps of training amplify (measured: 6e-6); without sync the difference is
# of order 1 either way.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", ["batch-sync", "layer"])
def test_ddp_on_two_processes_trains_like_one_process_with_twice_the_batch(
    two_processes, dtype_name, case
):
    norm, _ = TRAIN_CASES[case]
    model, _ = _single(norm, DTYPES[dtype_name])
    got = torch.load(two_processes / f"ddp-{dtype_name}-{case}.pt", weights_only=True)
    assert got.keys() == model.state_dict().keys()  # no "module." prefix
    assert _weights_error(got, model.state_dict()) <= TOLERANCE[dtype_name]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_ddp_batch_norm_without_sync_differs_the_documented_trap(two_processes, dtype_name):
    model, _ = _single("batch", DTYPES[dtype_name])
    got = torch.load(two_processes / f"ddp-{dtype_name}-batch-nosync.pt", weights_only=True)
    assert _weights_error(got, model.state_dict()) > 100 * TOLERANCE[dtype_name] + 1e-2


def test_two_process_run_files_are_the_single_process_format(two_processes):
    run = two_processes / "ddp-float64-batch-sync"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["format"] == "resnorm-checkpoint" and state["world_size"] == WORLD
    assert not any(k.startswith("module.") for k in state["model"])
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "global_batch_size": 2 * PER_PROCESS_BATCH,
    }
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    _, single = _single("batch", torch.float64)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row, expected in zip(rows, single.history):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert row[key] == pytest.approx(expected[key], rel=1e-9), key


def test_checkpoints_resume_exactly_and_across_world_sizes(two_processes):
    reference, _ = _single("batch", torch.float64)
    uninterrupted = torch.load(two_processes / "ddp-float64-batch-sync.pt", weights_only=True)
    same = torch.load(two_processes / "resume-2-by-2.pt", weights_only=True)
    assert same["resumed"] == 4
    for key, value in uninterrupted.items():  # same world size: bit for bit
        assert torch.equal(same["weights"][key], value), key
    other = torch.load(two_processes / "resume-1-by-2.pt", weights_only=True)
    assert other["resumed"] == 4
    assert _weights_error(other["weights"], reference.state_dict()) <= TOLERANCE["float64"]
    model, result = _single("batch", torch.float64, out=two_processes / "resume-2-by-1", every=4)
    assert result.resumed_from_step == 4
    assert _weights_error(model.state_dict(), reference.state_dict()) <= TOLERANCE["float64"]


# ------------------------------------------------------------------ the command line, for real


def _train_command(out, *extra):
    # 2 epochs of 50 steps (400 samples, 2 processes x 4), a checkpoint every 5 steps.
    return [
        sys.executable,
        "-m",
        "resnorm",
        "train",
        "--model",
        "mlp",
        "--depth",
        "1",
        "--width",
        "16",
        "--samples",
        "500",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "5",
        "--sync-bn",
        "--nproc",
        "2",
        "--out",
        str(out),
        "-q",
        *extra,
    ]


def _workers_of(launcher_pid):
    """{rank: pid} of the worker processes torchrun started for ``launcher_pid``."""
    workers = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            workers[int(env[b"RANK"])] = int(entry)
    return workers


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_worker_stops_the_launch_with_one_line_and_a_relaunch_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        _train_command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.02)
    workers = _workers_of(launcher.pid)
    assert set(workers) == {0, 1}, workers
    os.kill(workers[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"resnorm: error: worker rank 1 (pid {workers[1]}) was killed by SIGKILL"
    ), err
    assert "run the same command again to resume from step" in last
    assert not (out / "result.json").exists()  # it really stopped mid-run

    again = subprocess.run(
        _train_command(out), capture_output=True, text=True, env=env, timeout=300
    )
    assert again.returncode == 0, again.stderr
    resumed = int(again.stdout.split("resumed from step ")[1].split()[0])
    assert resumed > 0 and resumed % 5 == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "finished" and result["epochs_completed"] == 2
    assert [row["epoch"] for row in result["history"]] == [1, 2]


@pytest.mark.slow
def test_lab_nproc_runs_like_one_process(tmp_path):
    from resnorm.lab import parse_study, run_study

    study = parse_study("""
        name = "tiny"
        dataset = "synthetic"
        [dataset_options]
        shape = [8]
        num_classes = 3
        train_samples = 128
        test_samples = 64
        [train]
        epochs = 1
        optimizer = "sgd"
        lr = 0.05
        sync_bn = true
        [[grid]]
        models = ["mlp"]
        depths = [2]
        norms = ["batch"]
        residual = [true]
        batch_sizes = [16]
        options = { width = 8 }
    """)
    single = run_study(study, tmp_path / "one", workers=1, progress=False)
    double = run_study(study, tmp_path / "two", nproc=2, progress=False)
    assert [r["status"] for r in double] == ["finished"]
    assert single[0].keys() == double[0].keys()
    for key in ("final_test_acc", "final_train_loss", "parameters"):
        assert double[0][key] == pytest.approx(single[0][key], rel=1e-4), key
    assert (tmp_path / "two" / "runs" / double[0]["run_id"] / "summary.json").exists()
    config = json.loads(
        (tmp_path / "two" / "runs" / double[0]["run_id"] / "config.json").read_text()
    )
    assert config["config"]["batch_size"] == 8 and config["distributed"]["world_size"] == 2
