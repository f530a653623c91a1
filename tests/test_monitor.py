"""Tests of resnorm.diagnostics.Monitor: records every k-th step against hand computation,
dead units, update ratios on sampled rows, non-finite values and strict JSON lines,
TensorBoard, bad arguments, flush and write errors, float64 models."""

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F
from diagnostics_checks import _assert_no_hooks, _dead_relu_model, _strict_json
from torch import nn

from resnorm.diagnostics import Monitor


def _open_paths() -> set[str]:
    fd_dir = "/proc/self/fd"
    paths = set()
    for fd in os.listdir(fd_dir):
        try:
            paths.add(os.readlink(os.path.join(fd_dir, fd)))
        except OSError:
            pass
    return paths


def _compiled_or_skip(compiled: bool) -> bool:
    from resnorm.kernels import cpu

    if compiled and not cpu.status()["available"]:
        pytest.skip(f"compiled kernel unavailable: {cpu.status()['reason']}")
    return compiled


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("every", [1, 3])
def test_monitor_records_every_kth_step_by_hand(tmp_path, every, compiled):
    compiled = _compiled_or_skip(compiled)
    model = _dead_relu_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    relu_out = []
    handle = model[1].register_forward_hook(lambda m, i, o: relu_out.append(o.detach().clone()))
    path = tmp_path / "logs" / "monitor.jsonl"
    g = torch.Generator().manual_seed(1)
    expected = {}
    with Monitor(model, every=every, path=path, dead_units_every=1, compiled=compiled) as monitor:
        for step in range(1, 8):
            x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            before = {n: model[i].weight.detach().clone() for n, i in (("0", 0), ("2", 2))}
            optimizer.step()
            record = monitor.step(loss)
            if step % every:
                assert record is None
                continue
            expected[step] = {
                "loss": loss.item(),
                "grad_norm": {
                    n: model[i].weight.grad.norm().item() for n, i in (("0", 0), ("2", 2))
                },
                "update_ratio": {
                    n: ((model[i].weight - before[n]).norm() / model[i].weight.norm()).item()
                    for n, i in (("0", 0), ("2", 2))
                },
                "dead": (relu_out[-1] == 0).all(dim=0).float().mean().item(),
            }
            assert record is monitor.records[-1]
            assert monitor._fast is compiled  # the path under test is the one that ran
        assert monitor.steps == 7
        assert [r["step"] for r in monitor.records] == [s for s in range(1, 8) if s % every == 0]
        assert list(expected) == [r["step"] for r in monitor.records]
        for record in monitor.records:
            want = expected[record["step"]]
            assert record["loss"] == pytest.approx(want["loss"])
            assert record["nonfinite"] is False
            assert record["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
            assert record["update_ratio"] == pytest.approx(want["update_ratio"], rel=1e-4)
            assert set(record["dead_fraction"]) == {"1"}
            assert record["dead_fraction"]["1"] == pytest.approx(want["dead"])
            assert record["dead_fraction"]["1"] >= 0.5
        assert os.path.realpath(path) in _open_paths()
    lines = path.read_text().splitlines()
    assert len(lines) == len(monitor.records)
    assert [_strict_json(line) for line in lines] == monitor.records
    handle.remove()  # ours; the Monitor's must be gone
    _assert_no_hooks(model)
    assert os.path.realpath(path) not in _open_paths()
    monitor.close()  # idempotent


def test_monitor_counts_dead_units_on_every_tenth_record_by_default():
    model = _dead_relu_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    counted = []
    with Monitor(model) as monitor:
        for step in range(1, 23):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            record = monitor.step()
            counted.append(record["dead_fraction"] is not None)
            # Hooks are there only while the next forward's dead units will be counted.
            assert bool(model[1]._forward_hooks) == (step % 10 == 0)
    assert [i + 1 for i, c in enumerate(counted) if c] == [1, 11, 21]
    assert monitor.records[0]["dead_fraction"]["1"] >= 0.5
    _assert_no_hooks(model)
    with pytest.raises(ValueError, match="dead_units_every"):
        Monitor(model, dead_units_every=0)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("update_sample", [4096, None])
def test_monitor_update_ratio_on_sampled_rows(update_sample, compiled):
    compiled = _compiled_or_skip(compiled)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(32, 256), torch.randint(0, 4, (32,))
    previous_small = None
    with Monitor(model, update_sample=update_sample, compiled=compiled) as monitor:
        for step in range(3):
            if step == 2:  # storage moves (as after model.to(...)): the views must follow
                model[0].weight.data = model[0].weight.data.clone()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            before = model[0].weight.detach().clone()
            optimizer.step()
            record = monitor.step()
            after = model[0].weight.detach()
            exact = ((after - before).norm() / after.norm()).item()
            block = monitor._sample_index[0]
            if update_sample is None:
                assert block is None
                assert record["update_ratio"]["0"] == pytest.approx(exact, rel=1e-4)
            else:
                first, rows = block
                assert rows * 256 >= 4096 and rows < 256  # a block of whole rows
                sampled = (
                    (after - before)[first : first + rows].norm()
                    / after[first : first + rows].norm()
                ).item()
                assert record["update_ratio"]["0"] == pytest.approx(sampled, rel=1e-4)
                assert record["update_ratio"]["0"] == pytest.approx(exact, rel=0.5)
            # The small layer (4 x 256 = 1,024 entries) is always exact.
            if previous_small is not None:
                small = (
                    (model[2].weight.detach() - previous_small).norm() / model[2].weight.norm()
                ).item()
                assert record["update_ratio"]["2"] == pytest.approx(small, rel=1e-4)
            previous_small = model[2].weight.detach().clone()
            assert monitor._fast is compiled


def test_monitor_nonfinite_and_strict_jsonl(tmp_path):
    model = _dead_relu_model()
    path = tmp_path / "m.jsonl"
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with Monitor(model, path=path, track_dead_units=False) as monitor:
        F.cross_entropy(model(x), y).backward()
        ok = monitor.step(0.5)
        bad_loss = monitor.step(torch.tensor(float("nan")))
        model[2].weight.grad[0, 0] = float("inf")
        bad_grad = monitor.step(0.25)
    assert ok["nonfinite"] is False and ok["dead_fraction"] is None
    assert bad_loss["nonfinite"] is True and math.isnan(bad_loss["loss"])
    assert bad_grad["nonfinite"] is True and math.isinf(bad_grad["grad_norm"]["2"])
    lines = [_strict_json(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[1]["loss"] is None and lines[1]["nonfinite"] is True
    assert lines[2]["grad_norm"]["2"] is None and lines[2]["grad_norm"]["0"] is not None
    _assert_no_hooks(model)


def test_monitor_tensorboard_without_package(tmp_path):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    model = _dead_relu_model()
    path = tmp_path / "m.jsonl"
    with pytest.raises(ImportError, match="pip install tensorboard"):
        Monitor(model, path=path, tensorboard=tmp_path / "tb")
    # A Monitor that failed to start leaves nothing behind.
    _assert_no_hooks(model)
    assert os.path.realpath(path) not in _open_paths()


def test_monitor_rejects_bad_arguments():
    model = _dead_relu_model()
    with pytest.raises(ValueError, match="every"):
        Monitor(model, every=0)
    with pytest.raises(TypeError, match="every"):
        Monitor(model, every=1.5)
    with pytest.raises(TypeError):
        Monitor("model")
    with pytest.raises(ValueError, match="weight"):
        Monitor(nn.ReLU())
    _assert_no_hooks(model)


def test_monitor_flush_writes_pending_records_and_write_errors_surface(tmp_path):
    model = _dead_relu_model()
    path = tmp_path / "m.jsonl"
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with Monitor(model, path=path) as monitor:
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            monitor.step()
        monitor.flush()  # written while still open
        assert [_strict_json(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]

        def broken(_line):
            raise OSError("No space left on device")

        monitor._file.write = broken
        monitor.step()  # the writer thread fails ...
        with pytest.raises(RuntimeError, match="could not write its records: No space left"):
            monitor.flush()  # ... and the error surfaces
    assert monitor._thread is None  # close() joined the writer


def test_monitor_float64_model_takes_the_pytorch_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    with Monitor(model) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            before = model[0].weight.detach().clone()
            optimizer.step()
            record = monitor.step()
        assert monitor._fast is False  # the compiled statistics are float32 only
    assert record["grad_norm"]["0"] == pytest.approx(model[0].weight.grad.norm().item(), rel=1e-12)
    exact = ((model[0].weight - before).norm() / model[0].weight.norm()).item()
    # The weight samples are kept in float32, whatever the model's dtype.
    assert record["update_ratio"]["0"] == pytest.approx(exact, rel=1e-5)
