"""benchmarks/kernel_report.py without compiling (``make kernel-report`` compiles):
the Triton collector records a launch of every kernel of the backend at the presets,
missing collectors are skipped with a note, and the table is printed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from conftest import require_backend

from benchmarks import kernel_report


def test_every_triton_kernel_is_compiled_by_the_report():
    require_backend("triton")
    from benchmarks import kernel_report_triton
    from protoseg_kernels import triton as backend
    from protoseg_kernels.triton import _host

    defined = set()
    for info in pkgutil.iter_modules(backend.__path__):
        module = importlib.import_module(f"{backend.__name__}.{info.name}")
        for name, value in inspect.getmembers(module):
            if name.endswith("_kernel") and hasattr(value, "fn") and value.fn.__module__ == module.__name__:
                defined.add(value.fn.__name__)
    recorded = set()
    for n, d, c, k in kernel_report.presets().values():
        with _host.recording_launches() as launches:
            kernel_report_triton._backend_calls(n, d, c, k, kernel_report_triton.VARIANTS[0][0])
        recorded |= {launch.kernel.fn.__name__ for launch in launches}
    assert len(defined) >= 12
    assert defined == recorded


def test_missing_collector_is_skipped_with_a_note(capsys):
    assert kernel_report._import_collector("kernel_report_not_written") is None
    assert "does not exist yet" in capsys.readouterr().out


def test_missing_dependency_of_a_collector_is_an_error(monkeypatch):
    def broken(name):
        raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")

    monkeypatch.setattr(kernel_report.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError):
        kernel_report._import_collector("kernel_report_triton")


def test_table_lists_every_column():
    row = {"kernel": "k", "config": "bf16 BN64", "target": "sm_90", "registers": 128, "spills": 0, "stack": 0,
           "shared": 1024, "tensor_cores": 12}
    lines = kernel_report.format_table([row]).splitlines()
    assert lines[0].split() == list(kernel_report.COLUMNS)
    assert lines[2].split() == ["k", "bf16", "BN64", "sm_90", "128", "0", "0", "1024", "12"]
