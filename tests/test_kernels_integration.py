"""Tests of how ``resnorm.kernels.add_norm``, the fused residual add + layer/RMS norm, plugs
into PyTorch and the machine: the custom operator's registration (gradcheck, opcheck),
``torch.compile``, which implementation runs (dispatch, fallbacks), its argument checks, the
compiled kernel's output pool and its build. What it computes is tested in
``test_kernels_numerics.py``; the fixtures, helpers and tolerances both use are in
``kernel_cases.py``.

What is checked, and against what:

1. ``torch.autograd.gradcheck`` in float64 (the reference path and the registered autograd
   formula; gradgradcheck is not supported) and ``torch.library.opcheck`` (fake/meta
   implementations, autograd registration, AOT dispatch);
2. ``torch.compile(fullgraph=True)``: exactly one graph, no break, results equal to eager,
   with the default inductor backend too;
3. the fallbacks: float64 and float16 run the reference; ``RESNORM_KERNELS=reference``;
   small inputs, and a float32 layer norm without a residual, run stock PyTorch ops;
4. bad arguments, with messages that name the argument and what is accepted;
5. the output pool: outputs from it match the oracle and the unpooled kernel bit for bit,
   freed blocks are reused, the cap and ``empty_cache`` release them, its tensors resize,
   save and share like any other, and its settings (environment included) are checked;
6. the fused ReLU: gradcheck, the stock path for small inputs, torch.compile;
7. portability: the source built for AVX2 machines (``-march=x86-64-v3``, no AVX-512:
   the kernel's AVX-512 paths compiled out) gives the native build's results (slow: one
   more build).
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import subprocess
import sys

import kernel_cases
import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (
    Y_TOL,
    _assert_close,
    _case,
    _check,
    _data,
    _NontemporalSpy,
    _oracle,
    _params,
    _run,
    _same,
    _Scales,
)

from resnorm.kernels import (
    KINDS,
    add_norm,
    cpu,
    kernel_name,
    ops,
)

# The fixtures these tests share (kernel_cases.py), made this module's: pytest finds a
# module's fixtures by name, and the first one applies to every test here.
_through_the_operator = kernel_cases._through_the_operator
compiled = kernel_cases.compiled
only_compiled = kernel_cases.only_compiled
reference_calls = kernel_cases.reference_calls

_STOCK_BELOW = getattr(ops, "STOCK_BELOW", None)  # the default, before any fixture runs


# --------------------------------------------------------------------------------------------
# 1. gradcheck and opcheck


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind, prenorm, with_residual, affine, reference_calls):
    shape = (2, 3, 6)
    x, res, w, b, _ = _case(
        shape,
        50,
        dtype=torch.float64,
        residual=with_residual,
        weight=affine,
        bias=affine,
        kind=kind,
        param_dtype=torch.float64,
    )
    assert kernel_name(x) == "reference"
    names = [
        name
        for name, t in (("x", x), ("residual", res), ("weight", w), ("bias", b))
        if t is not None
    ]
    inputs = tuple(t.detach().requires_grad_() for t in (x, res, w, b) if t is not None)

    def fn(*tensors):
        return add_norm(**dict(zip(names, tensors)), kind=kind, eps=1e-3, prenorm=prenorm)

    assert torch.autograd.gradcheck(fn, inputs)
    # It was the operator's registered formula (the reference backward) that was checked.
    assert reference_calls["forward"] > 0 and reference_calls["backward"] > 0


def _opcheck(op, args):
    # test_schema is left out: it adds nothing here and costs tens of seconds on first use.
    torch.library.opcheck(
        op,
        args,
        test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize(
    "dtype,param_dtype,h_dtype",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, None),
        (torch.float64, torch.float64, torch.float64),
    ],
)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_opcheck(rms, activation, dtype, param_dtype, h_dtype, compiled):
    """The fake (meta) implementations agree with the real kernels on every output's shape
    and dtype, including the empty outputs (RMS mean, unrequested parameter gradients)."""
    x = _data((5, 24), 60, dtype)
    res = _data((5, 24), 61, dtype) if h_dtype is not None else None
    w, b = _params(24, 62, param_dtype, param_dtype)
    b = None if rms else b
    args = (x, res, w, b, rms, 1e-5, h_dtype, activation)
    _opcheck(torch.ops.resnorm.add_norm_fwd.default, args)
    _, h, mean, rstd = torch.ops.resnorm.add_norm_fwd(*args)
    h = h if h_dtype is not None else x
    dy = _data((5, 24), 63, dtype)
    dh = _data((5, 24), 64, h.dtype) if h_dtype is not None else None
    for need_dw, need_db in ((True, True), (False, False), (True, False)):
        _opcheck(
            torch.ops.resnorm.add_norm_bwd.default,
            (dy, dh, h, w, b, mean, rstd, rms, need_dw, need_db and not rms, activation),
        )


# --------------------------------------------------------------------------------------------
# 2. torch.compile


def _block(x, residual, weight, bias):
    """A pre-norm step: new stream h, normalized y, something downstream of both."""
    y, h = add_norm(x, residual, weight, bias, kind="layer", prenorm=True)
    z, _ = add_norm(y * 2.0, h, weight, None, kind="rms", prenorm=True)
    return z + h


def _compile_inputs(rows=6, n=40, seed=70):
    x, res, w, b, _ = _case((rows, n), seed)
    return [t.clone().requires_grad_() for t in (x, res, w, b)]


def _eager_and_compiled(compiled_fn, rows=6, n=40, eager_fn=None):
    results = []
    for fn in (eager_fn or _block, compiled_fn):
        inputs = _compile_inputs(rows, n)
        out = fn(*inputs)
        out.backward(_data(out.shape, 71, scale=1.0, shift=0.0))
        results.append([out.detach()] + [t.grad for t in inputs])
    return results


def _compile_counting(fn):
    """``torch.compile(fn, fullgraph=True)`` with a backend that records each graph it gets."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, backend=counting_backend, fullgraph=True), graphs


def test_compile_one_graph_no_break(compiled):
    torch._dynamo.reset()
    fn, graphs = _compile_counting(_block)
    eager, comp = _eager_and_compiled(fn)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.resnorm.add_norm_fwd.default) == 2, targets
    for a, b, name in zip(eager, comp, ("out", "dx", "dres", "dw", "db")):
        _same(b, a, f"compiled vs eager {name}")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_block)(*_compile_inputs())
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation
    torch._dynamo.reset()


def test_compile_aot_eager_dynamic_shapes(compiled):
    """aot_eager traces the forward and the backward operator through their fake
    implementations; with dynamic=True one graph serves several row counts."""
    torch._dynamo.reset()
    fn = torch.compile(_block, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (6, 9):
        eager, comp = _eager_and_compiled(fn, rows=rows)
        for a, b, name in zip(eager, comp, ("out", "dx", "dres", "dw", "db")):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"{rows} rows: {name}")
    torch._dynamo.reset()


def _single(x, residual, weight, bias):
    y, h = add_norm(x, residual, weight, bias, kind="layer", prenorm=True)
    return y, h


def test_compile_inductor_matches_eager(compiled):
    """The default backend, on a graph of one add_norm (forward and backward): inductor has
    little of its own to generate, so that this stays fast with a cold inductor cache."""
    torch._dynamo.reset()
    fn = torch.compile(_single, fullgraph=True)
    runs = []
    for f in (_single, fn):
        inputs = _compile_inputs()
        y, h = f(*inputs)
        torch.autograd.backward(
            [y, h],
            [_data(y.shape, 72, scale=1.0, shift=0.0), _data(h.shape, 73, scale=1.0, shift=0.0)],
        )
        runs.append([y.detach(), h.detach()] + [t.grad for t in inputs])
    for a, b, name in zip(*runs, ("y", "h", "dx", "dres", "dw", "db")):
        _same(b, a, f"inductor vs eager: {name}")
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# 3. fallbacks and dispatch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_fallback_dtypes(kind, dtype, reference_calls):
    x, res, w, b, dy = _case((5, 40), 130, dtype=dtype, kind=kind, param_dtype=dtype)
    dh = _data((5, 40), 131, dtype, scale=1.0, shift=0.0)
    assert kernel_name(x) == "reference"
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh)
    assert reference_calls == {"forward": 1, "backward": 1}
    _check(
        got,
        _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh),
        _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh),
        x=x,
        residual=res,
        what=str(dtype),
    )


def test_default_path_small_input():
    """Whatever path ``add_norm`` takes by default for a small input, it matches the oracle."""
    x, res, w, b, dy = _case((3, 24), 135)
    monkeypatch = pytest.MonkeyPatch()
    if _STOCK_BELOW is not None:  # undo the module's autouse fixture, for this test only
        monkeypatch.setattr(ops, "STOCK_BELOW", _STOCK_BELOW)
    try:
        got = _run(add_norm, x, res, w, b, dy=dy, dh=dy)
    finally:
        monkeypatch.undo()
    _check(
        got,
        _oracle(x, res, w, b, dy=dy, dh=dy),
        _Scales.of(x, res, w, b, dy=dy, dh=dy),
        x=x,
        residual=res,
        what="default path",
    )


@pytest.mark.parametrize(
    "kind,dtype,stock",
    [
        ("layer", torch.float32, True),
        ("layer", torch.bfloat16, False),
        ("rms", torch.float32, False),
    ],
)
def test_default_path_without_residual(kind, dtype, stock, compiled, monkeypatch):
    """By default a float32 layer norm with nothing to add runs stock F.layer_norm (the
    compiled kernel is not called); bfloat16 and RMS norm keep the kernel. Both match the
    oracle, gradients included."""
    monkeypatch.setattr(ops, "STOCK_PLAIN_LAYER_NORM", True)
    spy = _NontemporalSpy(cpu.load())
    monkeypatch.setitem(cpu._state, "module", spy)
    x, _, w, b, dy = _case((6, 40), 136, dtype=dtype, residual=False, kind=kind)
    dh = _data((6, 40), 137, dtype, scale=1.0, shift=0.0)
    assert kernel_name(x, with_residual=False, kind=kind) == ("stock" if stock else "compiled cpu")
    assert kernel_name(x, kind=kind) == "compiled cpu"  # with a residual: the kernel
    got = _run(add_norm, x, None, w, b, kind=kind, dy=dy, dh=dh)
    assert (spy.calls == []) == stock
    _check(
        got,
        _oracle(x, None, w, b, kind=kind, dy=dy, dh=dh),
        _Scales.of(x, None, w, b, kind=kind, dy=dy, dh=dh),
        x=x,
        weight=w,
        what=f"{kind} {dtype} without residual",
    )


def test_resnorm_kernels_reference_environment():
    code = (
        "import torch\n"
        "from resnorm import kernels as k\n"
        "x = torch.randn(4, 8)\n"
        "y, h = k.add_norm(x, x, prenorm=True)\n"
        "assert torch.allclose(y, k.add_norm_reference(x, x), atol=1e-6)\n"
        "print(k.kernel_name(torch.randn(2048, 1024)), k.cpu.status()['reason'])\n"
    )
    env = dict(os.environ, RESNORM_KERNELS="reference")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "reference", out.stdout
    assert "RESNORM_KERNELS=reference" in out.stdout, out.stdout


# --------------------------------------------------------------------------------------------
# 4. bad arguments


X = torch.zeros(2, 3)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"x": [[1.0, 2.0]]}, TypeError, r"x must be a torch\.Tensor, got list"),
        (
            {"x": X, "residual": torch.zeros(2, 4)},
            ValueError,
            r"residual must have shape \(2, 3\), got \(2, 4\)",
        ),
        (
            {"x": X, "residual": [1.0]},
            TypeError,
            r"residual must be a torch\.Tensor or None, got list",
        ),
        (
            {"x": X, "weight": torch.ones(4)},
            ValueError,
            r"weight must have shape \(3,\), got \(4,\)",
        ),
        (
            {"x": X, "weight": torch.ones(2, 3)},
            ValueError,
            r"weight must have shape \(3,\), got \(2, 3\)",
        ),
        ({"x": X, "bias": torch.zeros(5)}, ValueError, r"bias must have shape \(3,\), got \(5,\)"),
        (
            {"x": X, "bias": torch.zeros(3), "kind": "rms"},
            ValueError,
            r"bias.*kind='rms'.*bias=None",
        ),
        (
            {"x": torch.zeros(2, 3, dtype=torch.int64)},
            TypeError,
            r"x has dtype torch\.int64; accepted: float32, bfloat16, float16, float64",
        ),
        (
            {"x": torch.zeros(2, 3, dtype=torch.complex64)},
            TypeError,
            r"x has dtype torch\.complex64; accepted: float32",
        ),
        (
            {"x": X, "weight": torch.ones(3, dtype=torch.int32)},
            TypeError,
            r"weight has dtype torch\.int32; accepted",
        ),
        (
            {"x": X, "kind": "batch"},
            ValueError,
            r"kind='batch' is not supported; accepted values: 'layer', 'rms'",
        ),
        (
            {"x": X, "activation": "gelu"},
            ValueError,
            r"activation='gelu' is not supported; accepted values: 'identity', 'relu'",
        ),
        ({"x": X, "eps": -1e-5}, ValueError, r"eps must be in \[0, inf\], got -1e-05"),
        ({"x": X, "eps": float("nan")}, ValueError, r"eps must be in \[0, inf\], got nan"),
        ({"x": X, "eps": "small"}, TypeError, r"eps must be a number, got 'small'"),
        (
            {"x": torch.zeros(2, 0)},
            ValueError,
            r"x must have a non-empty last dimension, got shape \(2, 0\)",
        ),
        ({"x": torch.tensor(1.0)}, ValueError, r"non-empty last dimension, got shape \(\)"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        add_norm(**kwargs)


# --------------------------------------------------------------------------------------------
# 5. the output pool


MiB = 1 << 20


@pytest.fixture
def pool(compiled):
    """A pool serving outputs of 1 MiB and more (the default is 4 MiB), empty at the start;
    the process's settings come back afterwards."""
    before = cpu.pool_stats()
    cpu.empty_cache()
    yield cpu.configure_pool(enabled=True, min_bytes=MiB, max_cached=64 * MiB)
    cpu.configure_pool(
        enabled=before["min_bytes"] >= 0,
        min_bytes=cpu.POOL_MIN_BYTES,
        max_cached=before["max_cached"],
    )
    cpu.empty_cache()


def _pooled_case(kind, seed=170):
    x, res, w, b, dy = _case((300, 1024), seed, kind=kind)  # 1.2 MiB per float32 output
    return x, res, w, b, dy, _data((300, 1024), seed + 1, scale=1.0, shift=0.0)


def _counts(stats):
    return stats["hits"], stats["misses"]


@pytest.mark.parametrize("kind", KINDS)
def test_pool_outputs_match_oracle_and_unpooled(kind, only_compiled, pool):
    x, res, w, b, dy, dh = _pooled_case(kind)
    hits, misses = _counts(pool)
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh)
    assert _counts(cpu.pool_stats()) == (hits, misses + 3)  # y, h forward; dx backward
    hits, misses = _counts(cpu.pool_stats())
    _check(
        got,
        _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh),
        _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh),
        x=x,
        residual=res,
        what="pooled",
    )
    cpu.configure_pool(enabled=False)
    plain = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh)
    assert _counts(cpu.pool_stats()) == (hits, misses)  # off: the pool was not asked
    for name, a in got.fields().items():
        _same(a, getattr(plain, name), f"pooled vs PyTorch's allocator: {name}")


def test_pool_reuses_freed_blocks_huge_page_aligned(only_compiled, pool):
    x, res, w, b, _, _ = _pooled_case("layer")
    hits, misses = _counts(pool)
    y, h = add_norm(x, res, w, b, prenorm=True)
    first = {y.data_ptr(), h.data_ptr()}
    assert all(p % (2 * MiB) == 0 for p in first)  # mapped on huge-page boundaries
    del y, h
    stats = cpu.pool_stats()
    assert stats["cached_blocks"] == 2 and stats["cached_bytes"] == 4 * MiB  # 2 MiB granules
    y, h = add_norm(x, res, w, b, prenorm=True)
    assert {y.data_ptr(), h.data_ptr()} == first
    assert _counts(cpu.pool_stats()) == (hits + 2, misses + 2)
    assert cpu.pool_stats()["cached_blocks"] == 0
    torch.testing.assert_close(y, F.layer_norm(x + res, (1024,), w, b), rtol=0, atol=1e-5)


def test_pool_hands_out_the_most_recently_freed_block(only_compiled, pool):
    """Last in, first out among blocks of one size: the block freed last is the one most
    likely still in cache (first in, first out handed out the coldest)."""
    module = cpu.load()
    gc.collect()  # no other test's pooled tensor may be freed in between
    gc.disable()
    try:
        blocks = [module.empty_output(300, 1024, torch.float32) for _ in range(3)]
        addresses = [t.data_ptr() for t in blocks]
        del blocks[1]  # freed first
        del blocks[-1]  # freed last
        assert cpu.pool_stats()["cached_blocks"] == 2
        again = [module.empty_output(300, 1024, torch.float32) for _ in range(2)]
        assert [t.data_ptr() for t in again] == [addresses[2], addresses[1]]
        assert cpu.pool_stats()["cached_blocks"] == 0
    finally:
        gc.enable()


def test_pool_cap_and_empty_cache(only_compiled, pool):
    x, res, w, b, _, _ = _pooled_case("rms")
    cpu.configure_pool(max_cached=2 * MiB)  # room for one of the two 2 MiB blocks
    y, h = add_norm(x, res, w, None, kind="rms", prenorm=True)
    del y, h
    stats = cpu.pool_stats()
    assert stats["cached_bytes"] == 2 * MiB
    assert stats["released_blocks"] == pool["released_blocks"] + 1
    cpu.configure_pool(max_cached=0)  # lowering the cap releases at once
    assert cpu.pool_stats()["cached_bytes"] == 0
    cpu.configure_pool(max_cached=64 * MiB)
    y, h = add_norm(x, res, w, None, kind="rms", prenorm=True)
    del y, h
    assert cpu.pool_stats()["cached_blocks"] == 2
    cpu.empty_cache()
    assert cpu.pool_stats()["cached_bytes"] == 0 and cpu.pool_stats()["cached_blocks"] == 0


def test_pool_tensors_behave_like_any_other(only_compiled, pool, tmp_path):
    x, res, w, b, _, _ = _pooled_case("layer")
    y = add_norm(x, res, w, b)
    want = y.clone()
    torch.save(y, tmp_path / "y.pt")
    torch.testing.assert_close(
        torch.load(tmp_path / "y.pt", weights_only=True), want, rtol=0, atol=0
    )
    y.resize_(600, 1024)  # grows: a new block, the old data kept
    torch.testing.assert_close(y[:300], want, rtol=0, atol=0)
    y.share_memory_()  # moved to shared memory; block freed
    assert y.is_shared()
    torch.testing.assert_close(y[:300], want, rtol=0, atol=0)
    z = add_norm(x, res, w, b) * 2 + 1  # pooled outputs feed stock ops
    torch.testing.assert_close(z, want * 2 + 1, rtol=0, atol=0)


def test_pool_settings_checked(compiled):
    with pytest.raises(
        ValueError,
        match=r"configure_pool: min_bytes must be a non-negative "
        r"int, got -1",
    ):
        cpu.configure_pool(min_bytes=-1)
    with pytest.raises(ValueError, match=r"max_cached must be a non-negative int, got 1\.5"):
        cpu.configure_pool(max_cached=1.5)
    with pytest.raises(TypeError, match=r"enabled must be True, False or None, got 'yes'"):
        cpu.configure_pool(enabled="yes")


@pytest.mark.parametrize(
    "text,value",
    [
        ("0", 0),
        ("4096", 4096),
        ("4K", 4096),
        ("1.5M", 3 << 19),
        ("2GiB", 2 << 30),
        ("1gb", 1 << 30),
        ("3 T", 3 << 40),
    ],
)
def test_parse_bytes(text, value):
    assert cpu.parse_bytes("RESNORM_POOL_MAX_CACHED", text) == value


@pytest.mark.parametrize("text", ["", "G", "12x", "-1", "1.5.2M", "four"])
def test_parse_bytes_rejects(text):
    with pytest.raises(
        ValueError,
        match=rf"RESNORM_POOL_MAX_CACHED='{re.escape(text)}' is not "
        r"a byte count; accepted: a non-negative number",
    ):
        cpu.parse_bytes("RESNORM_POOL_MAX_CACHED", text)


@pytest.mark.parametrize(
    "env,expect",
    [
        ({"RESNORM_POOL": "off", "RESNORM_POOL_MAX_CACHED": "256M"}, "-1 268435456"),
        ({"RESNORM_POOL": "on"}, f"{4 << 20} "),
        (
            {"RESNORM_POOL": "maybe"},
            "ValueError: RESNORM_POOL='maybe' is not accepted; accepted: on, off",
        ),
        (
            {"RESNORM_POOL_MAX_CACHED": "lots"},
            "ValueError: RESNORM_POOL_MAX_CACHED='lots' is not a byte count",
        ),
    ],
)
def test_pool_environment(env, expect, compiled):
    code = (
        "from resnorm.kernels import cpu\n"
        "try:\n"
        "    s = cpu.status()['pool']\n"
        "    print(s['min_bytes'], s['max_cached'])\n"
        "except ValueError as e:\n"
        "    print(f'ValueError: {e}')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(expect), out.stdout


def test_pool_in_forked_child(compiled):
    """A forked child (a DataLoader worker, say) allocates from the pool it inherited and gets
    the parent's results; the pool's lock is taken around fork, so a fork cannot leave it
    held. The child runs one intra-op thread, as DataLoader workers do: GNU OpenMP, under
    PyTorch's own ops as under this kernel, hangs in a forked child whose parent used it."""
    code = (
        "import multiprocessing as mp, torch\n"
        "from resnorm.kernels import add_norm, cpu, ops\n"
        "cpu.configure_pool(min_bytes=1 << 20)\n"
        "torch.manual_seed(0)\n"
        "x, r = torch.randn(300, 1024), torch.randn(300, 1024)\n"
        "ops.STOCK_BELOW = 0\n"
        "def child(_):\n"
        "    torch.set_num_threads(1)\n"
        "    y, h = add_norm(x, r, prenorm=True)\n"
        "    return float(y.double().sum()), float(h.double().sum()), cpu.pool_stats()['hits']\n"
        "y, h = add_norm(x, r, prenorm=True)\n"
        "del y, h\n"
        "y, h = add_norm(x, r, prenorm=True)\n"
        "want = (float(y.double().sum()), float(h.double().sum()))\n"
        "del y, h\n"
        "with mp.get_context('fork').Pool(1) as pool:\n"
        "    got = pool.map(child, [0, 1])\n"
        "assert all(g[:2] == want for g in got), (got, want)\n"
        "assert all(g[2] >= 2 for g in got), got\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stdout


# --------------------------------------------------------------------------------------------
# 6. the fused ReLU


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_relu_gradcheck_float64(kind, with_residual, reference_calls):
    x, res, w, b, _ = _case(
        (3, 8),
        320,
        dtype=torch.float64,
        residual=with_residual,
        kind=kind,
        param_dtype=torch.float64,
    )
    names = [
        name
        for name, t in (("x", x), ("residual", res), ("weight", w), ("bias", b))
        if t is not None
    ]
    inputs = tuple(t.detach().requires_grad_() for t in (x, res, w, b) if t is not None)

    def fn(*tensors):
        return add_norm(
            **dict(zip(names, tensors)), kind=kind, eps=1e-3, prenorm=True, activation="relu"
        )

    y, _ = fn(*inputs)
    assert bool((y == 0).any()) and bool((y > 0).any())
    assert torch.autograd.gradcheck(fn, inputs)
    assert reference_calls["backward"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_relu_stock_path_matches_kernel(kind, compiled, monkeypatch):
    """Small inputs run stock ops (F.layer_norm then F.relu); they agree with the kernel."""
    x, res, w, b, dy = _case((5, 64), 330, kind=kind)
    kernel = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dy, activation="relu")
    monkeypatch.setattr(ops, "STOCK_BELOW", _STOCK_BELOW)
    assert kernel_name(x, kind=kind, activation="relu") == "stock"
    stock = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dy, activation="relu")
    sc = _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dy)
    _assert_close(stock.y, kernel.y, 2 * Y_TOL * sc.y, "y")
    assert torch.equal(stock.y > 0, kernel.y > 0)
    for name, scale in (("dx", sc.dx), ("dres", sc.dx), ("dw", sc.dw), ("db", sc.db)):
        if getattr(kernel, name) is not None:
            _assert_close(getattr(stock, name), getattr(kernel, name), 2e-5 * scale, name)


def test_relu_plain_layer_norm_runs_the_kernel(compiled, monkeypatch):
    """Without a residual, a float32 layer norm runs stock F.layer_norm, but not with the
    ReLU fused: one pass instead of two."""
    monkeypatch.setattr(ops, "STOCK_PLAIN_LAYER_NORM", True)
    monkeypatch.setattr(ops, "STOCK_BELOW", 0)
    x = torch.zeros(4, 32)
    assert kernel_name(x, with_residual=False) == "stock"
    assert kernel_name(x, with_residual=False, activation="relu") == "compiled cpu"


def _relu_block(x, residual, weight, bias):
    y, h = add_norm(x, residual, weight, bias, kind="layer", prenorm=True, activation="relu")
    return y * 2.0 + h


def test_relu_compile_one_graph_matches_eager(compiled):
    torch._dynamo.reset()
    fn, graphs = _compile_counting(_relu_block)
    runs = _eager_and_compiled(fn, eager_fn=_relu_block)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.resnorm.add_norm_fwd.default) == 1, targets
    for a, b, name in zip(*runs, ("out", "dx", "dres", "dw", "db")):
        _same(b, a, f"compiled vs eager {name}")
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# 7. portability


@pytest.mark.slow
def test_builds_and_matches_without_avx512(compiled):
    """The kernel's AVX-512 code (register-streamed stores) has fallbacks that this
    machine's native build never compiles: build the source for AVX2 and compare."""
    import platform

    from torch.utils import cpp_extension

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"AVX2 is an x86-64 build; this machine is {platform.machine()}")
    name = f"resnorm_add_norm_cpu_avx2_{cpu.build_key()}"
    directory = cpu.build_directory().parent / name
    directory.mkdir(parents=True, exist_ok=True)
    flags = [f for f in cpu.FLAGS if not f.startswith(("-march", "-mprefer"))]
    avx2 = cpp_extension.load(
        name=name,
        sources=[str(cpu.CSRC / f) for f in cpu.SOURCES],
        build_directory=str(directory),
        extra_cflags=flags + ["-march=x86-64-v3"],
        verbose=False,
    )
    native = cpu.load()
    for rows, n in [(300, 768), (17, 100)]:
        x, res, w, b, dy = _case((rows, n), 400 + n)
        for nontemporal, relu in itertools.product((False, True), (False, True)):
            runs = []
            for module in (native, avx2):
                h = torch.empty(rows, n)
                y, mean, rstd = module.add_norm_fwd(x, res, w, b, False, 1e-5, h, nontemporal, relu)
                dx = torch.empty(rows, n)
                dw, db = module.add_norm_bwd(
                    dy, h, h, w, b, mean, rstd, False, True, True, dx, nontemporal, relu
                )
                runs.append((y, h, mean, rstd, dx, dw, db))
            names = ("y", "h", "mean", "rstd", "dx", "dw", "db")
            for got, want, what in zip(runs[1], runs[0], names):
                torch.testing.assert_close(
                    got,
                    want,
                    rtol=1e-5,
                    atol=1e-5,
                    msg=lambda m: f"{rows}x{n} {nontemporal=} {relu=} {what}: {m}",
                )
