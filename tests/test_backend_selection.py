"""Backend selection (docs/spec.md §4): auto, use_backend, $PROTOSEG_BACKEND, explicit
backends that cannot serve, and import without the optional parts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import partial_backend
import pytest
import torch
from helpers import make_case

import protoseg_kernels as pk
from protoseg_kernels import _backend, env
from protoseg_kernels._op_table import OPS_BY_NAME


def test_reference_is_always_available():
    assert "reference" in pk.available_backends()
    assert set(pk.available_backends()) <= set(_backend.BACKEND_NAMES)


def test_auto_on_cpu_prefers_cpu_backend_then_reference():
    expected = "cpu" if "cpu" in pk.available_backends() else "reference"
    with pk.use_backend("auto"):
        assert _backend.resolve_backend("class_scores", torch.device("cpu")) == expected


def test_use_backend_nests_and_restores():
    with pk.use_backend("reference"):
        assert _backend.requested_backend() == "reference"
        with pk.use_backend("auto"):
            assert _backend.requested_backend() == "auto"
        assert _backend.requested_backend() == "reference"


def test_use_backend_restores_after_exception():
    before = _backend._overrides.get()
    with pytest.raises(KeyError), pk.use_backend("reference"):
        raise KeyError
    assert _backend._overrides.get() == before


def test_use_backend_holds_for_its_own_thread_only():
    """Two threads, each inside its own use_backend, interleaved by barriers: each sees
    its own choice, a third thread sees none, and each computes its backend's result."""
    import threading

    case = make_case(67, 13, 5, 4, seed=3, dtype=torch.float32)
    expected = {name: None for name in ("reference", "triton", "cpu") if name in pk.available_backends()}
    barrier = threading.Barrier(len(expected) + 1)
    seen, errors = {}, []

    def worker(name):
        try:
            with pk.use_backend(name):
                barrier.wait()  # every thread is inside its with block now
                for _ in range(3):
                    seen.setdefault(name, set()).add(_backend.requested_backend())
                    expected[name] = pk.class_scores(case.x, case.prototypes, return_index=True)
                barrier.wait()
        except Exception as exc:  # reported below, with the thread's backend
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            barrier.abort()

    def bystander():
        barrier.wait()
        seen["bystander"] = {_backend.requested_backend()}
        barrier.wait()

    threads = [threading.Thread(target=worker, args=(name,)) for name in expected]
    threads.append(threading.Thread(target=bystander))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert seen == {**{name: {name} for name in expected}, "bystander": {os.environ.get("PROTOSEG_BACKEND", "auto")}}
    reference = expected["reference"]
    for name, result in expected.items():
        torch.testing.assert_close(result.scores, reference.scores, rtol=1e-5, atol=1e-5, msg=name)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with pk.use_backend("fast"):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("PROTOSEG_BACKEND", "reference")
    assert _backend.requested_backend() == "reference"
    monkeypatch.setenv("PROTOSEG_BACKEND", "bogus")
    with pytest.raises(RuntimeError, match="PROTOSEG_BACKEND='bogus'"):
        _backend.requested_backend()


def test_explicit_backend_that_cannot_serve_cpu_tensors_raises():
    x, p = torch.randn(4, 3), torch.randn(2, 2, 3)
    with pk.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        pk.class_scores(x, p)


def test_explicit_unavailable_backend_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(_backend._MODULES, "cpu", "protoseg_kernels.no_such_module")
    _backend._load.cache_clear()
    try:
        with pk.use_backend("cpu"), pytest.raises(RuntimeError, match="backend 'cpu' cannot run.*no_such_module"):
            pk.class_scores(torch.randn(4, 3), torch.randn(2, 2, 3))
        assert "cpu" not in pk.available_backends()
    finally:
        _backend._load.cache_clear()


@pytest.fixture
def broken_cpu(monkeypatch):
    """The cpu backend's extension fails to load, as one built against another torch would."""
    monkeypatch.setitem(_backend._MODULES, "cpu", "protoseg_kernels.no_such_module")
    monkeypatch.setattr(_backend, "_warned_fallbacks", set())
    monkeypatch.delenv("PROTOSEG_FALLBACK", raising=False)
    _backend._load.cache_clear()
    yield
    _backend._load.cache_clear()


def test_auto_falls_back_to_reference_with_one_warning_naming_the_reason(broken_cpu):
    x, p = torch.randn(4, 3), torch.randn(2, 2, 3)
    with pytest.warns(pk.BackendFallbackWarning, match=r"slow 'reference' backend because 'cpu' did not load "
                                                        r"\(cpu: importing protoseg_kernels.no_such_module failed"):
        assert pk.backend_for(x) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is quiet
        pk.class_scores(x, p)


@pytest.mark.parametrize("policy", ["error", "silent", "bogus"])
def test_the_fallback_policy_raises_or_stays_silent(broken_cpu, monkeypatch, policy):
    monkeypatch.setenv("PROTOSEG_FALLBACK", policy)
    x, p = torch.randn(4, 3), torch.randn(2, 2, 3)
    if policy == "error":
        with pytest.raises(RuntimeError, match="'cpu' did not load.*PROTOSEG_FALLBACK=silent"):
            pk.class_scores(x, p)
    elif policy == "silent":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert pk.class_scores(x, p).shape == (4, 2)
    else:
        with pytest.raises(RuntimeError, match="PROTOSEG_FALLBACK='bogus' is not a policy"):
            pk.class_scores(x, p)


def test_no_warning_when_an_op_or_dtype_is_served_elsewhere_by_design(monkeypatch):
    monkeypatch.setattr(_backend, "_warned_fallbacks", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pk.backend_for(torch.randn(3, 2)) == "cpu"
        assert pk.backend_for(torch.randn(3, 2), "tree_min_loss") == "cpu"
        with pk.use_backend("reference"):
            assert pk.backend_for(torch.randn(3, 2)) == "reference"
    with pytest.raises(ValueError, match="'tree_triplet' is not an op of the table"):
        pk.backend_for(torch.randn(3, 2), "tree_triplet")
    with pk.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        pk.backend_for(torch.randn(3, 2))


def test_auto_skips_a_backend_that_cannot_take_the_dtype(monkeypatch):
    # triton computes in fp16/bf16/fp32 only: auto must pass float64 on to the next backend
    # (on a GPU, cuda) instead of picking triton and failing. Under the interpreter triton
    # serves CPU tensors, which lets this run without a GPU.
    if _backend._serving_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("needs the triton backend on CPU tensors (TRITON_INTERPRET=1)")
    monkeypatch.setitem(_backend._AUTO_ORDER, "cpu", ("triton", "reference"))
    for op in _backend.get_backend("triton").IMPLEMENTED.dtypes:
        assert _backend.resolve_backend(op, torch.device("cpu"), torch.float32) == "triton"
        assert _backend.resolve_backend(op, torch.device("cpu"), torch.float64) == "reference"
    x, p = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)
    assert pk.class_scores(x, p).dtype == torch.float64
    with pk.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        pk.class_scores(x, p)


@pytest.fixture
def partial(monkeypatch):
    """Backend cuda_emulated replaced by tests/partial_backend.py, first in auto's CPU order."""
    monkeypatch.setitem(_backend._MODULES, "cuda_emulated", "partial_backend")
    monkeypatch.setitem(_backend._AUTO_ORDER, "cpu", ("cuda_emulated", "reference"))
    _backend._load.cache_clear()
    yield "cuda_emulated"
    _backend._load.cache_clear()


def test_auto_picks_only_a_backend_that_implements_the_op_in_the_dtype(partial):
    cpu = torch.device("cpu")
    assert _backend.resolve_backend("class_scores", cpu, torch.float32) == partial
    assert _backend.resolve_backend("class_scores", cpu, torch.float64) == "reference"
    assert _backend.resolve_backend(partial_backend.NOT_IMPLEMENTED, cpu) == "reference"
    assert _backend.resolve_backend(partial_backend.PARTIAL, cpu) == "reference"
    c = make_case(30, 6, 3, 2, dtype=torch.float32, seed=1)
    assert pk.sinkhorn_assign(c.x, c.prototypes, c.labels).index.shape == (30,)


def test_explicit_backend_that_lacks_the_op_or_a_kernel_raises(partial):
    c = make_case(30, 6, 3, 2, dtype=torch.float32, seed=1)
    with pk.use_backend(partial):
        assert pk.class_scores(c.x, c.prototypes).shape == (30, 3)
        with pytest.raises(RuntimeError, match="'cuda_emulated' cannot run sinkhorn_assign: .*does not implement"):
            pk.sinkhorn_assign(c.x, c.prototypes, c.labels)
        with pytest.raises(RuntimeError, match="lacks the kernel.s. momentum_update of update_prototypes"):
            pk.update_prototypes(c.prototypes, c.x, c.labels, c.index)
        with pytest.raises(TypeError, match="computes class_scores in fp16, bf16, fp32, not torch.float64"):
            pk.class_scores(c.x.double(), c.prototypes.double())


def test_op_outside_the_table_is_an_error():
    with pytest.raises(ValueError, match="'no_such_op' is not an op of the table"):
        _backend.resolve_backend("no_such_op", torch.device("cpu"))


def test_env_table_shows_what_each_backend_serves_and_why_not(partial):
    table = env.op_table()
    assert set(table) == set(OPS_BY_NAME)
    assert table["class_scores"]["reference"] == "fp16 bf16 fp32 fp64"
    assert table["class_scores"][partial] == "fp16 bf16 fp32"
    assert table["class_scores"]["auto (cpu)"] == f"{partial} (fp64: reference)"
    assert "does not implement sinkhorn_assign" in table["sinkhorn_assign"][partial]
    assert table["sinkhorn_assign"]["auto (cpu)"] == "reference"
    assert "lacks the kernel(s) momentum_update" in table["update_prototypes"][partial]


def test_import_without_extension_and_triton():
    # A fresh interpreter in which neither the compiled extension nor triton imports.
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['protoseg_kernels._C'] = None\n"
        "sys.modules['protoseg_kernels._C_emulated'] = None\n"
        "import torch, protoseg_kernels as pk\n"
        "from protoseg_kernels._backend import unavailable_reason\n"
        "print(pk.available_backends())\n"
        "print(pk.class_scores(torch.randn(5, 3), torch.randn(2, 2, 3)).shape)\n"
        "print(unavailable_reason('cpu'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROTOSEG_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0] == "['reference']"
    assert lines[1] == "torch.Size([5, 2])"
    assert "pip install --no-build-isolation" in lines[2]


def test_env_report_runs():
    out = subprocess.run([sys.executable, "-m", "protoseg_kernels.env"], capture_output=True, text=True,
                         check=True).stdout
    for key in ("torch", "triton", "backends:", "reference", "extension_build", "op × backend", "auto (cpu)"):
        assert key in out
    for op in OPS_BY_NAME:
        assert f"  {op} (docs/spec.md §" in out


def test_env_report_survives_a_bad_backend_variable_and_says_what_serves_what():
    env_vars = {**os.environ, "PROTOSEG_BACKEND": "bogus"}
    result = subprocess.run([sys.executable, "-m", "protoseg_kernels.env"], capture_output=True, text=True,
                            env=env_vars)
    assert result.returncode == 0, result.stderr
    assert re.search(r"requested_backend +invalid: PROTOSEG_BACKEND='bogus' is not a backend", result.stdout)
    assert re.search(r"reference +available for cpu", result.stdout)


def test_backend_status_names_the_devices_served_here(monkeypatch):
    assert env.backend_status("reference").startswith("available for cpu")
    if not torch.cuda.is_available() and _backend.unavailable_reason("cuda") is None:
        assert env.backend_status("cuda") == "loaded, but no device here it serves (no CUDA device is available)"
    monkeypatch.setitem(_backend._MODULES, "cuda_emulated", "protoseg_kernels.no_such_module")
    _backend._load.cache_clear()
    try:
        assert "importing protoseg_kernels.no_such_module failed" in env.backend_status("cuda_emulated")
    finally:
        _backend._load.cache_clear()


def test_the_cuda_backend_on_a_cpu_only_torch_does_not_advise_a_toolkit(monkeypatch):
    from protoseg_kernels._compiled import cuda, cuda_emulated

    monkeypatch.setattr(torch.version, "cuda", None)
    reason = cuda.unavailable_reason()
    assert "is a CPU-only build" in reason and "CUDA_HOME" not in reason
    monkeypatch.setattr(cuda_emulated, "_EXTENSION_PROBLEM", "missing")
    assert cuda_emulated.unavailable_reason().startswith("not built: a test-only backend")


def test_the_backend_choice_is_a_compile_time_constant_without_importing_dynamo_early():
    import torch._dynamo

    def marked_by_torch():
        return 0

    torch._dynamo.assume_constant_result(marked_by_torch)
    # What torch's decorator does is exactly what ours does, and _resolve carries it.
    assert marked_by_torch.__dict__ == {"_dynamo_marked_constant": True}
    assert _backend._resolve._dynamo_marked_constant is True
    code = "import sys, protoseg_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "False"  # importing the library does not pay for torch._dynamo (~1.5 s)


def test_an_extension_built_for_another_torch_is_refused_naming_both_versions():
    from protoseg_kernels._compiled import build_mismatch, running_torch

    running = running_torch()
    assert build_mismatch(dict(running, compiler="any")) is None
    assert build_mismatch({}) is None  # nothing recorded: nothing to compare
    message = build_mismatch(dict(running, torch="2.4.0", cxx11_abi=not running["cxx11_abi"]))
    assert f"torch '2.4.0' (built) vs {running['torch']!r} (running)" in message
    assert "cxx11_abi" in message and "pip install --no-build-isolation" in message
    # In a fresh process the stale build is not even imported: the compiled backends report it
    # and `auto` under PROTOSEG_FALLBACK=error raises it.
    code = (
        "import sys, torch, protoseg_kernels as pk\n"
        "import protoseg_kernels._compiled as compiled\n"
        "recorded = dict(compiled.build_info(), torch='1.13.0')\n"
        "compiled.build_info = lambda: recorded\n"
        "from protoseg_kernels._backend import unavailable_reason\n"
        "print(unavailable_reason('cpu'))\n"
        "print('protoseg_kernels._C' in sys.modules)\n"
        "try:\n"
        "    pk.class_scores(torch.randn(5, 3), torch.randn(2, 2, 3))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROTOSEG_BACKEND"}
    env.update(PROTOSEG_FALLBACK="error", PYTHONPATH=os.pathsep.join(sys.path))
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           check=True).stdout.splitlines()
    assert f"torch '1.13.0' (built) vs {torch.__version__!r} (running)" in lines[0]
    assert lines[1] == "False"
    assert "1.13.0" in lines[2] and torch.__version__ in lines[2]


@pytest.mark.parametrize("dynamo_traces_contextvars", [True, False], ids=["contextvar", "mirror"])
def test_compiled_code_follows_use_backend(monkeypatch, dynamo_traces_contextvars):
    """Under torch.compile the backend is read at trace time and guarded: entering another
    use_backend block recompiles. Before torch 2.14 Dynamo cannot trace ContextVar.get, and
    the module-global mirror of the stack stands in (forced here on any torch)."""
    if dynamo_traces_contextvars and not _backend._DYNAMO_TRACES_CONTEXTVARS:
        pytest.skip(f"Dynamo of torch {torch.__version__} cannot trace ContextVar.get")
    monkeypatch.setattr(_backend, "_DYNAMO_TRACES_CONTEXTVARS", dynamo_traces_contextvars)
    torch._dynamo.reset()

    def f(x):
        return x + len(_backend.requested_backend())

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.zeros(3)
    seen = []
    for name in ("reference", "cpu", "reference"):
        with pk.use_backend(name):
            seen.append(int(compiled(x)[0]))
    assert seen == [len("reference"), len("cpu"), len("reference")]
    torch._dynamo.reset()
