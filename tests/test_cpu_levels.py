"""The CPU kernels' instruction-set levels (protoseg_kernels/_compiled/cpu_levels.py).

* Choosing a level: the best one the CPU runs, or the one PROTOSEG_CPU_CAPABILITY names,
  refused with a clear reason when it was not built or the CPU lacks its instructions.
* The binaries: the disassembly of every module that loads unguarded (``_C``, the
  baseline kernels) holds no instruction beyond x86-64's baseline, the AVX2 kernels none
  beyond AVX2, and the AVX-512 kernels do use AVX-512 (the levels are not all the same).
* Every level this machine runs computes what the float64 reference computes (the
  differential fuzzer, restricted to the cpu backend, in a process per level).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import protoseg_kernels
from protoseg_kernels._compiled import cpu, cpu_levels

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(protoseg_kernels.__file__).parent
X86 = cpu_levels.is_x86_64()


def _module_file(name: str) -> Path | None:
    found = sorted(PACKAGE.glob(f"{name}.*.so")) + sorted(PACKAGE.glob(f"{name}.so"))
    return found[0] if found else None


BUILT = [name for name in cpu_levels.level_order() if _module_file(f"_cpu_{name}")]


# ---- choosing ----------------------------------------------------------------------
def test_the_best_level_the_cpu_runs_is_chosen():
    built = ["baseline", "avx2", "avx512"]
    assert cpu_levels.choose(built, None, lambda name: True) == ("avx512", None)
    assert cpu_levels.choose(built, None, lambda name: name != "avx512") == ("avx2", None)
    assert cpu_levels.choose(["baseline"], None, lambda name: True) == ("baseline", None)


def test_a_requested_level_must_be_built_and_runnable():
    built = ["baseline", "avx2"]
    assert cpu_levels.choose(built, "baseline", lambda name: True) == ("baseline", None)
    level, reason = cpu_levels.choose(built, "avx512", lambda name: True)
    assert level is None and "PROTOSEG_CPU_CAPABILITY='avx512'" in reason and "baseline, avx2" in reason
    level, reason = cpu_levels.choose(built, "avx2", lambda name: name == "baseline")
    assert level is None and "lacks its instructions" in reason
    assert cpu_levels.choose([], None, lambda name: True)[0] is None


def test_support_follows_the_cpu_flags_then_torch():
    avx2, avx512 = cpu_levels.X86_LEVELS[1:]
    flags = cpu_levels._X86_64_V3
    assert cpu_levels.supports(avx2, flags, None) and not cpu_levels.supports(avx512, flags, None)
    assert cpu_levels.supports(avx512, cpu_levels._X86_64_V4, None)
    assert not cpu_levels.supports(avx2, flags - {"fma"}, "AVX512")  # the flags decide when known
    assert cpu_levels.supports(avx512, None, "AVX512") and not cpu_levels.supports(avx512, None, "AVX2")
    assert cpu_levels.supports(cpu_levels.BASELINE, frozenset(), None)


def test_builds_compile_every_level_or_the_custom_one():
    assert [lv.name for lv in cpu_levels.build_levels(None, "x86_64")] == ["baseline", "avx2", "avx512"]
    assert [lv.name for lv in cpu_levels.build_levels(None, "aarch64")] == ["baseline"]
    (custom,) = cpu_levels.build_levels("native", "x86_64")
    assert custom.name == "custom" and custom.compile_flags == ("-march=native",)


def test_the_loaded_level_is_the_best_built_one_this_cpu_runs():
    if cpu_levels.requested_level():
        pytest.skip("PROTOSEG_CPU_CAPABILITY is set")
    assert BUILT, "no protoseg_kernels._cpu_<level> module was built"
    expected, _ = cpu_levels.choose(BUILT, None, cpu.cpu_runs)
    assert cpu.CPU_LEVEL == expected and cpu.unavailable_reason() is None


# ---- the binaries ------------------------------------------------------------------
# Beyond x86-64 (SSE2): AVX and later (VEX/EVEX mnemonics start with v; ymm/zmm/mask
# registers), SSE3/SSSE3/SSE4, POPCNT/LZCNT/TZCNT, BMI, MOVBE.
_ABOVE_SSE2 = re.compile(
    r"%[yz]mm|%k[0-7]\b|^v[a-z]|^(pshufb|palignr|phadd|phsub|pabs[bwd]|pmaddubsw|pmulhrsw|psign[bwd]|"
    r"blendv?p[sd]|pblend|dpp[sd]|extractps|insertps|movntdqa|mpsadbw|packusdw|pcmpeqq|pcmpgtq|"
    r"pextr[bdq]|pinsr[bdq]|pmax[su][bdw]|pmin[su][bdw]|pmov[sz]x|pmuldq|pmulld|ptest|round[ps][sd]|"
    r"phminposuw|pcmp[ei]str|crc32|popcnt|lzcnt|tzcnt|andn|bextr|blsi|blsr|blsmsk|bzhi|pdep|pext|"
    r"sarx|shlx|shrx|rorx|mulx|movbe|addsubp|haddp|hsubp|lddqu|movddup|movs[hl]dup)\b")
# AVX-512 only: zmm and mask registers, the upper 16 vector registers, EVEX-only mnemonics.
_AVX512 = re.compile(
    r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|^(vpternlog|vperm[ti]2|vpcompress|vpexpand|vcompress|"
    r"vexpand|vfixupimm|vrndscale|vscalef|vgetexp|vgetmant|vrsqrt14|vrcp14|vpmovm2|vpmov[bwdq]2m|vpbroadcastm|"
    r"valign|vpro[lr]|vpconflict|vplzcnt|vpmullq|vpabsq|vpmaxsq|vpminsq|vpmaxuq|vpminuq|vpsraq|vcvt[a-z0-9]*qq|"
    r"vcvt[a-z0-9]*udq|vcvtu|vpmov[qdw][bdw]|vpmovs|vpmovus|vextract[fi](32|64)x|vinsert[fi](32|64)x|"
    r"vshuf[fi](32|64)x|vbroadcast[fi](32|64)x|kmov|kor|kand|knot|kxor|kshift|ktest|kortest|kunpck)")
_AVX2_OR_FMA = re.compile(r"^(vfmadd|vfnmadd|vfmsub|vpbroadcast|vperm[dq]|vpgather|vgather|vinserti128)")


# Functions that carry their own target attribute (PROTOSEG_AVX2, csrc/cpu/vec_math.h) and
# run only after a run-time CPU check: guarded, so allowed in any module.
_GUARDED = re.compile(r"PROTOSEG_AVX2\s+(?:inline\s+)?[\w:<>,*&\s]*?\b(\w+)\s*\(")


def _guarded_names() -> set[str]:
    names = set()
    for source in (REPO / "csrc").rglob("*"):
        if source.suffix in (".h", ".cpp"):
            names |= set(_GUARDED.findall(source.read_text()))
    return {name for name in names if not name.startswith("__")}  # not the macro's own definition


def _instructions(path: Path) -> list[str]:
    """'mnemonic operands' of every instruction of the module's code outside the guarded
    functions."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(path)], capture_output=True,
                         text=True, check=True).stdout
    guarded = _guarded_names()
    lines, skipping = [], False
    for line in out.splitlines():
        function = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if function:
            name = function.group(1)
            skipping = any(re.search(rf"\b{g}\b", name) for g in guarded)
            continue
        parts = line.split("\t")
        if not skipping and len(parts) >= 2 and parts[0].strip().endswith(":"):
            lines.append(parts[1].strip())
    return lines


def _offending(path: Path, pattern: re.Pattern) -> list[str]:
    found = [insn for insn in _instructions(path) if pattern.search(insn)]
    return sorted(set(found))[:10]


def test_the_guarded_functions_are_found():
    assert {"forward_lanes", "backward_lanes", "sigmoid_pair", "is_nan"} <= _guarded_names()


needs_objdump = pytest.mark.skipif(not X86 or shutil.which("objdump") is None,
                                   reason="the disassembly checks are for x86-64 with binutils' objdump")


@needs_objdump
@pytest.mark.parametrize("module", ["_C", "_cpu_baseline"])
def test_unguarded_modules_hold_nothing_beyond_the_x86_64_baseline(module):
    path = _module_file(module)
    if path is None:
        pytest.skip(f"protoseg_kernels.{module} is not built (PROTOSEG_CPU_ARCH build)")
    assert len(_instructions(path)) > 1000  # the disassembly was read
    assert not _offending(path, _ABOVE_SSE2), _offending(path, _ABOVE_SSE2)


@needs_objdump
def test_the_avx2_kernels_use_avx2_and_nothing_of_avx512():
    path = _module_file("_cpu_avx2")
    if path is None:
        pytest.skip("no avx2 level in this build")
    assert not _offending(path, _AVX512), _offending(path, _AVX512)
    assert _offending(path, _AVX2_OR_FMA)


@needs_objdump
def test_the_avx512_kernels_use_avx512():
    path = _module_file("_cpu_avx512")
    if path is None:
        pytest.skip("no avx512 level in this build")
    assert _offending(path, _AVX512)


# ---- every level computes the reference's results -------------------------------------
FUZZ = (
    "import sys\n"
    "from protoseg_kernels._compiled import cpu\n"
    "assert cpu.CPU_LEVEL == sys.argv[1], (cpu.CPU_LEVEL, cpu.unavailable_reason())\n"
    "sys.path.insert(0, 'tests')\n"
    "import fuzz\n"
    "sys.exit(fuzz.main(['--seconds', '10', '--seed', '21', '--backends', 'cpu']))\n"
)


@pytest.mark.parametrize("level", [lv for lv in cpu_levels.level_order()])
def test_every_level_matches_the_reference(level):
    if level not in BUILT:
        pytest.skip(f"level {level} is not built")
    if not cpu.cpu_runs(level):
        pytest.skip(f"this CPU cannot run level {level}")
    env = dict(os.environ, PROTOSEG_CPU_CAPABILITY=level)
    done = subprocess.run([sys.executable, "-c", FUZZ, level], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "fuzzing cpu" in done.stdout


def test_an_unbuilt_requested_level_makes_the_backend_unavailable_with_the_reason():
    code = ("from protoseg_kernels._compiled import cpu\n"
            "print(cpu.CPU_LEVEL, '|', cpu.unavailable_reason())\n")
    env = dict(os.environ, PROTOSEG_CPU_CAPABILITY="sse1")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    assert done.stdout.startswith("None |") and "PROTOSEG_CPU_CAPABILITY='sse1'" in done.stdout


def test_the_env_report_shows_the_level_in_use():
    done = subprocess.run([sys.executable, "-m", "protoseg_kernels.env"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=True)
    line = next(line for line in done.stdout.splitlines() if "cpu_kernel_level" in line)
    assert f"{cpu.CPU_LEVEL} (built: " in line and "this CPU runs:" in line
