"""Bad command lines end in one line on stderr and exit status 2, before any work: no
traceback, nothing written, no allocation the machine cannot hold."""

import dataclasses
import os

import pytest
import torch

from resnorm import cli
from resnorm._checks import check_device, check_fits_in_memory, physical_memory
from resnorm._io import check_writable_path
from resnorm.errors import UsageError, UsageTypeError
from resnorm.lab.study import MAX_RUNS, MAX_SEEDS, StudyError, check_run_count, load_study
from resnorm.models import create_model, get_model_entry, registry

HUGE = "99999999999"

# (command line, words the one line must hold); {tmp} is the test's empty folder.
CASES = {
    # output paths: under a file, on a file system that takes no files, a folder for a file
    "train-out-under-file": (
        ["train", "--model", "mlp", "--out", "/etc/passwd/x"],
        ["--out", "/etc/passwd", "not a folder"],
    ),
    "lab-out-under-file": (["lab", "--out", "/etc/passwd/x"], ["--out", "/etc/passwd"]),
    "bench-out-under-file": (
        ["bench", "--out", "/etc/passwd/x.json"],
        ["--out", "/etc/passwd", "not a folder"],
    ),
    "diagnose-html-under-file": (
        ["diagnose", "mlp", "--html", "/etc/passwd/x.html"],
        ["--html", "/etc/passwd"],
    ),
    "diagnose-figure-sys": (
        ["diagnose", "mlp", "--figure", "/sys/x.png"],
        ["--figure", "/sys", "cannot create"],
    ),
    "train-out-proc": (
        ["train", "--model", "mlp", "--out", "/proc/resnorm-x"],
        ["--out", "/proc", "cannot create"],
    ),
    "lab-out-sys": (["lab", "--out", "/sys/kernel/resnorm-x"], ["--out", "/sys/kernel"]),
    "bench-out-is-folder": (["bench", "--out", "{tmp}"], ["--out", "directory"]),
    "diagnose-html-is-folder": (["diagnose", "mlp", "--html", "{tmp}"], ["--html", "directory"]),
    "train-out-is-file": (
        ["train", "--model", "mlp", "--out", "/etc/passwd"],
        ["--out", "/etc/passwd", "is a file"],
    ),
    # study names that are not study files
    "lab-empty-study": (["lab", ""], ["study", "empty", "built-in"]),
    "lab-folder-study": (["lab", "/etc"], ["study", "/etc", "folder"]),
    "lab-binary-study": (["lab", "{tmp}/binary.toml"], ["binary.toml", "utf-8"]),
    "lab-unreadable-study": (["lab", "/proc/self/mem"], ["/proc/self/mem", "cannot be read"]),
    "lab-device-study": (["lab", "/dev/zero"], ["/dev/zero", "regular file"]),
    # devices
    "train-device-index": (
        ["train", "--model", "mlp", "--device", "cpu:notanumber"],
        ["--device", "cpu:notanumber", "cuda:N"],
    ),
    "lab-device-index": (["lab", "--device", "cpu:notanumber"], ["--device", "cpu:notanumber"]),
    "lab-device-kind": (["lab", "--device", "meta"], ["--device", "meta", "accepted"]),
    "train-device-absent": (
        ["train", "--model", "mlp", "--device", "cuda:99"],
        ["--device", "cuda:99"],
    ),
    # numbers without bounds
    "train-dist-timeout-inf": (
        ["train", "--model", "mlp", "--dist-timeout", "inf"],
        ["--dist-timeout", "inf", "finite"],
    ),
    "train-dist-timeout-nan": (
        ["train", "--model", "mlp", "--dist-timeout", "nan"],
        ["--dist-timeout", "finite"],
    ),
    "lab-seeds": (["lab", "--seeds", "99999999"], ["--seeds", "99,999,999 runs", "1000"]),
    "train-width": (
        ["train", "--model", "mlp", "--samples", "100", "--width", HUGE],
        ["mlp", f"width={HUGE}", "memory"],
    ),
    "diagnose-width": (["diagnose", "mlp", "--width", HUGE], ["mlp", f"width={HUGE}", "memory"]),
    "train-samples": (["train", "--model", "mlp", "--samples", HUGE], [HUGE, "memory"]),
    "bench-shapes": (
        ["bench", "--shapes", "999999999x999999999"],
        ["--shapes", "999999999x999999999", "GiB", "memory"],
    ),
    "diagnose-input-shape": (
        ["diagnose", "mlp", "--input-shape", "99999999,99999999"],
        ["(99999999, 99999999)", "GiB", "memory"],
    ),
    "train-batch-size": (
        ["train", "--model", "mlp", "--batch-size", "100000000"],
        ["--batch-size", "100000000", str(2**24)],
    ),
    "diagnose-batch-size": (
        ["diagnose", "mlp", "--batch-size", "100000000", "--input-shape", "1000"],
        ["batch_size=100000000", "GiB", "memory"],
    ),
}


def _generate_nothing(num_samples, seed, train_split):
    """MNIST-1D's loader checks num_samples against memory before it generates: a call
    here means that check is gone (and would run for days)."""
    raise AssertionError(f"MNIST-1D generation started for num_samples={num_samples}")


@pytest.mark.parametrize("case", CASES)
def test_bad_command_line_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    argv, words = CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe name = 'x'")
    if case == "train-samples":
        monkeypatch.setattr("resnorm.data.mnist1d._generate", _generate_nothing)
    before = sorted(tmp_path.iterdir())

    code = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])

    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("resnorm: error: "), err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    assert sorted(tmp_path.iterdir()) == before  # nothing written, no probe left behind
    for arg in argv:
        if arg.startswith(("/proc/resnorm", "/sys/", "/etc/passwd/")):
            assert not os.path.lexists(arg)


def test_writable_paths_are_accepted_and_left_untouched(tmp_path):
    check_writable_path("--out", tmp_path / "new" / "run", "dir")
    check_writable_path("--out", tmp_path, "dir")
    check_writable_path("--html", tmp_path / "new" / "page.html", "file")
    (tmp_path / "old.json").write_text("{}")
    check_writable_path("--out", tmp_path / "old.json", "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
    with pytest.raises(UsageError, match="--out='' |empty"):
        check_writable_path("--out", "", "dir")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_well_formed_devices_are_accepted(device):
    assert check_device("device", device) == device


@pytest.mark.parametrize(
    "device", ["cpu:notanumber", "cpu:1", "cuda:x", "cuda:-1", "", "CPU", "meta", "xla"]
)
def test_malformed_devices_are_rejected(device):
    with pytest.raises(UsageError, match="accepted: auto, cpu, cuda, cuda:N"):
        check_device("device", device)
    with pytest.raises(UsageTypeError):
        check_device("device", 0)


def test_unavailable_device_is_rejected_only_when_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("device", "cuda:1", available=True) == "cuda:1"
    with pytest.raises(UsageError, match="2 CUDA device"):
        check_device("device", "cuda:2", available=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UsageError, match="CUDA is not available"):
        check_device("device", "cuda", available=True)
    assert check_device("device", "auto", available=True) == "auto"


def test_memory_check_passes_what_fits():
    check_fits_in_memory("a small thing", 1 << 20)
    with pytest.raises(UsageError, match="a big thing would need .* GiB"):
        check_fits_in_memory("a big thing", 2 * physical_memory())


def test_run_count_is_counted_without_expanding_and_bounded():
    study = load_study("depth")
    assert check_run_count(study, 3) == len(study.runs(3))
    with pytest.raises(UsageError, match=f"at most {MAX_SEEDS} seeds"):
        check_run_count(study, MAX_SEEDS + 1)
    wide = dataclasses.replace(
        study, grid=[{**study.grid[0], "depths": list(range(1, MAX_RUNS + 2))}]
    )
    with pytest.raises(StudyError, match="runs; at most 100,000"):
        check_run_count(wide, 1)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("mlp", {}),
        ("mlp", {"norm": "layer", "depth": 3}),
        ("resnet20", {}),
        ("resnet1d_20", {"norm": "group"}),
        ("densenet_cifar", {}),
        ("transformer", {}),
    ],
)
def test_memory_check_keeps_weights_and_rng_bit_identical(name, overrides):
    """create_model's meta build neither draws from nor moves the RNG: the weights are
    those of the builder called directly, and so is the RNG state after."""
    entry = get_model_entry(name)
    torch.manual_seed(7)
    direct = entry.builder(**{**entry.defaults, **overrides, **entry.fixed}).state_dict()
    after_direct = torch.get_rng_state()
    torch.manual_seed(7)
    checked = create_model(name, **overrides).state_dict()
    assert torch.equal(torch.get_rng_state(), after_direct)
    assert checked.keys() == direct.keys()
    for key in direct:
        assert torch.equal(checked[key], direct[key]), key


def test_memory_check_counts_parameters_and_buffers(monkeypatch):
    monkeypatch.setattr(
        registry, "check_fits_in_memory", lambda what, nbytes, note: seen.append(nbytes)
    )
    seen = []
    model = create_model("resnet20")
    tensors = [*model.parameters(), *model.buffers()]
    assert seen == [sum(t.numel() * t.element_size() for t in tensors)]


def test_a_builder_that_needs_real_tensors_still_builds(monkeypatch):
    def builder(width: int = 4, norm: str = "none", residual: bool = True):
        layer = torch.nn.Linear(width, width)
        layer.weight.detach().numpy()  # needs values: fails on the meta device
        return layer

    monkeypatch.setitem(
        registry._REGISTRY, "needs_values", registry.ModelEntry("needs_values", builder)
    )
    assert isinstance(create_model("needs_values"), torch.nn.Linear)
