"""Where the compiled CPU kernel is built and cached, and what its build says.

Only ``test_cold_build_says_so_once_and_warm_load_is_silent`` compiles (in a subprocess, into
a temporary cache); the others check the cache key and directory functions directly.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from resnorm.kernels import cpu


@pytest.fixture
def shared_root(monkeypatch, tmp_path):
    """One cache root, as two environments sharing TORCH_EXTENSIONS_DIR would see it."""
    monkeypatch.delenv("RESNORM_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    return tmp_path / "extensions"


def _copy_source(tmp_path, extra: bytes = b"") -> Path:
    """A copy of the kernel's csrc/ folder elsewhere, ``extra`` appended to its first source."""
    copy = tmp_path / "elsewhere" / cpu.CSRC.name
    copy.mkdir(parents=True)
    for path in cpu.source_files():
        data = path.read_bytes() + (extra if path.name == cpu.SOURCES[0] else b"")
        (copy / path.name).write_bytes(data)
    return copy


# Each changes one thing a second environment (or a new revision) would differ in.
CHANGES = {
    "sys.prefix": lambda mp, tmp: mp.setattr(sys, "prefix", "/opt/another-venv"),
    "torch version": lambda mp, tmp: mp.setattr(torch, "__version__", "2.99.0+cpu"),
    "torch install path": lambda mp, tmp: mp.setattr(
        torch, "__file__", "/opt/another-venv/site-packages/torch/__init__.py"
    ),
    "python version": lambda mp, tmp: mp.setattr(sys, "version", "3.99.0 (main) [GCC 99]"),
    "source bytes": lambda mp, tmp: mp.setattr(cpu, "CSRC", _copy_source(tmp, b"\n// v2\n")),
    "flags": lambda mp, tmp: mp.setattr(cpu, "FLAGS", [*cpu.FLAGS, "-DRESNORM_OTHER"]),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_what_changes_the_binary_changes_the_directory(change, shared_root, monkeypatch, tmp_path):
    before = cpu.build_directory()
    CHANGES[change](monkeypatch, tmp_path)
    after = cpu.build_directory()
    assert after != before, f"a different {change} must build into its own directory"
    assert after.parent == before.parent == shared_root


def test_same_inputs_same_directory(shared_root, monkeypatch, tmp_path):
    first = cpu.build_directory()
    assert cpu.build_directory() == first
    # The source is keyed by its bytes, not its path: the same file elsewhere is the same build.
    monkeypatch.setattr(cpu, "CSRC", _copy_source(tmp_path))
    assert cpu.build_directory() == first
    assert first.parent == shared_root
    name = first.name
    key = name.removeprefix("resnorm_add_norm_cpu_")
    assert name.startswith("resnorm_add_norm_cpu_") and len(key) == 16
    assert all(c in "0123456789abcdef" for c in key)
    assert key == cpu.build_key()


def test_build_key_covers_each_input():
    inputs = cpu.build_inputs()
    assert {"source", "flags", "torch", "torch_path", "python", "abi", "prefix"} <= set(inputs)
    key = cpu.build_key(inputs)
    assert cpu.build_key(dict(inputs)) == key
    for name, value in inputs.items():
        changed = dict(inputs, **{name: value + (b"x" if isinstance(value, bytes) else "x")})
        assert cpu.build_key(changed) != key, name
    # Values are delimited: moving a byte from one input to the next is another key.
    shifted = dict(
        inputs, flags=inputs["flags"][:-1], prefix=inputs["flags"][-1] + inputs["prefix"]
    )
    assert cpu.build_key(shifted) != key


def test_torch_extensions_dir_is_honoured(monkeypatch, tmp_path):
    monkeypatch.delenv("RESNORM_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch-ext"))
    assert cpu.cache_root() == tmp_path / "torch-ext"
    assert cpu.build_directory().parent == tmp_path / "torch-ext"
    # resnorm's own variable wins over PyTorch's.
    monkeypatch.setenv("RESNORM_KERNEL_CACHE", str(tmp_path / "ours"))
    assert cpu.build_directory().parent == tmp_path / "ours"


def test_default_root_is_pytorchs(monkeypatch, tmp_path):
    monkeypatch.delenv("RESNORM_KERNEL_CACHE", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu.cache_root() == Path(cpp_extension.get_default_build_root())
    assert cpu.cache_root() == (tmp_path / "xdg" / "torch_extensions").resolve()


def test_needs_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CSRC", _copy_source(tmp_path))
    directory = tmp_path / "resnorm_add_norm_cpu_0123456789abcdef"
    directory.mkdir()
    assert cpu._needs_compile(directory)  # nothing built yet
    library = directory / f"{directory.name}.so"
    library.write_bytes(b"")
    for source in cpu.source_files():
        os.utime(source, (1_000_000, 1_000_000))
    os.utime(library, (2_000_000, 2_000_000))
    assert not cpu._needs_compile(directory)
    for source in cpu.source_files():  # any one rewritten since (a header too): ninja rebuilds
        os.utime(source, (3_000_000, 3_000_000))
        assert cpu._needs_compile(directory), source.name
        os.utime(source, (1_000_000, 1_000_000))


class _FakeModule:
    def configure_pool(self, min_bytes, max_cached):
        pass

    def pool_stats(self):
        return {}


def test_load_announces_a_compile_once_and_a_cached_load_never(shared_root, monkeypatch, capsys):
    """load()'s logic around cpp_extension.load, without compiling: the compile is faked."""
    builds = []

    def fake_load(*, name, build_directory, **kwargs):
        builds.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return _FakeModule()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.delenv("RESNORM_KERNELS", raising=False)

    def fresh_process():
        monkeypatch.setattr(
            cpu,
            "_state",
            {"module": None, "error": None, "tried": False, "pool_min_bytes": cpu.POOL_MIN_BYTES},
        )

    fresh_process()
    assert isinstance(cpu.load(), _FakeModule)
    assert isinstance(cpu.load(), _FakeModule)
    cpu.status()
    err = capsys.readouterr().err
    directory = cpu.build_directory()
    assert err.splitlines() == [
        f"resnorm: building the fused CPU kernel, once, ~30 s (cached in {directory})"
    ]
    assert len(builds) == 1

    fresh_process()  # a later process finds the library built
    assert isinstance(cpu.load(), _FakeModule)
    assert capsys.readouterr().err == ""


_PROBE = textwrap.dedent("""
    import json
    from resnorm.kernels import cpu
    first = cpu.load()
    again = cpu.load()
    status = cpu.status()
    print(json.dumps({"available": first is not None, "same": first is again,
                      "reason": status["reason"], "directory": status["build_directory"]}))
""")


def _probe(env):
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_cold_build_says_so_once_and_warm_load_is_silent(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here: the kernel cannot be built")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RESNORM_KERNEL_CACHE", "RESNORM_KERNELS")
    }
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")

    cold, err = _probe(env)
    assert cold["available"], cold["reason"]
    assert cold["same"]
    directory = Path(cold["directory"])
    assert directory.parent == tmp_path / "extensions"
    assert (directory / f"{directory.name}.so").is_file()
    ours = [line for line in err.splitlines() if line.startswith("resnorm:")]
    assert ours == [f"resnorm: building the fused CPU kernel, once, ~30 s (cached in {directory})"]

    warm, err = _probe(env)
    assert warm["available"], warm["reason"]
    assert Path(warm["directory"]) == directory
    assert [line for line in err.splitlines() if line.startswith("resnorm:")] == []
