"""The command line: help, doctor, and building the CUDA op on a machine without a GPU."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from frozenseg.cli import app
from frozenseg.ops import build

runner = CliRunner()
needs_nvcc = pytest.mark.skipif(
    build.find_cuda_home() is None or torch.version.cuda is None,
    reason="needs nvcc and a CUDA build of torch",
)


def test_help_lists_doctor():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "doctor" in result.output


def test_doctor_reports_versions_without_building_on_a_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine doctor builds the kernel")
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert torch.__version__ in result.output and "skipped: no GPU" in result.output
    rows = [line for line in result.output.splitlines() if "CPU kernel vs fallback" in line]
    assert len(rows) == 3 and all(row.rstrip(" │").endswith("ok") for row in rows), rows


def test_doctor_without_a_cpu_build_says_the_fallback_serves(monkeypatch):
    def fail():
        raise build.BuildError("no C++ compiler: c++ not found (set CXX or install g++)")

    monkeypatch.setattr(build, "load_cpu_extension", fail)
    result = runner.invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "no C++ compiler" in result.output and "fallback is used" in result.output
    assert "CPU kernel vs fallback" not in result.output


@pytest.mark.build
@pytest.mark.slow
@needs_nvcc
def test_build_ops_compiles_the_cuda_source(tmp_path, monkeypatch):
    """The kernel in cuda/ compiles, so a compile error can't land. sm_90 alone: its device
    code is a superset of sm_80's (the vector atomics under __CUDA_ARCH__ >= 900, then the
    scalar loop every architecture runs), and one architecture halves the compile."""
    monkeypatch.setenv("FROZENSEG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", {})
    result = runner.invoke(app, ["doctor", "--build-ops", "--arch", "9.0"])
    assert result.exit_code == 0, result.output
    built = list(tmp_path.glob("ops/*/frozenseg_ms_deform_attn*.so"))
    assert len(built) == 1
    module = build.load_extension("9.0")
    assert callable(module.forward) and callable(module.backward)


def _failing_cuda_build(tmp_path, monkeypatch, kernel=None):
    """Point the build at a copy of the sources for a CUDA build that nvcc is to fail, and
    return the copy of the kernel (rewritten by ``kernel(text)`` when given).

    The copy's host bindings (ms_deform_attn.cpp) are emptied: compiling them means parsing
    all of torch/extension.h, about a minute, and ninja waits for that job to end before it
    reports nvcc's failure. An empty translation unit compiles at once, so the error in the
    output is nvcc's, on the kernel. The CPU op is left out: doctor lists it as not built
    (information, not a failure), so CUDA's row is the only one that can fail, and the test
    doesn't compile the CPU op again when it runs alone."""
    sources = tmp_path / "cuda"
    shutil.copytree(build.source_dir(), sources)
    (sources / "ms_deform_attn.cpp").write_text("// emptied: not what this test builds\n")
    cu = sources / "ms_deform_attn_kernel.cu"
    if kernel is not None:
        cu.write_text(kernel(cu.read_text()))
    monkeypatch.setattr(build, "source_dir", lambda: sources)
    monkeypatch.setenv("FROZENSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_loaded", {})

    def no_cpu_op():
        raise build.BuildError("left out by this test")

    monkeypatch.setattr(build, "load_cpu_extension", no_cpu_op)
    return cu


# Each error is planted where nvcc stops at once. An error its front end finds anywhere in
# the real kernel, even above the includes, comes after a parse of all of torch's headers
# (the front end reads on past an error): about 40 s, minutes on a loaded machine.
COMPILE_ERRORS = {
    # The preprocessor's fatal error, as for a header a minimal toolkit lacks: the real
    # kernel, which nvcc stops reading at its first line.
    "missing header": (lambda text: '#include "undeclared_name.h"\n' + text,
                       "ms_deform_attn_kernel.cu:1:10: fatal error: undeclared_name.h"),
    # nvcc's own front end, in its format "file(line): error: ...", on a kernel holding
    # only the mistake.
    "undeclared name": (lambda text: "static int broken = undeclared_name;\n",
                        'ms_deform_attn_kernel.cu(1): error: identifier "undeclared_name"'),
}


@pytest.mark.build
@needs_nvcc
@pytest.mark.parametrize("planted", COMPILE_ERRORS, ids=lambda name: name.replace(" ", "_"))
def test_a_compile_error_fails_build_ops_with_the_compilers_first_error(
        tmp_path, monkeypatch, planted):
    kernel, first_error = COMPILE_ERRORS[planted]
    cu = _failing_cuda_build(tmp_path, monkeypatch, kernel)
    result = runner.invoke(app, ["doctor", "--build-ops", "--arch", "8.0"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    # The unwrapped "error: CUDA op build: ..." line: the compiler's first error, whole.
    error = next(line for line in result.output.splitlines()
                 if line.startswith("error: CUDA op build:"))
    assert first_error in error and str(cu) in error, error


@pytest.mark.build
@needs_nvcc
def test_an_architecture_nvcc_does_not_know_is_named(tmp_path, monkeypatch):
    _failing_cuda_build(tmp_path, monkeypatch)
    result = runner.invoke(app, ["doctor", "--build-ops", "--arch", "99.0"])
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    # compute_990: the flag build.gencode_flags made of 99.0 is the one nvcc refused.
    assert "Unsupported gpu architecture 'compute_990'" in output, result.output


def test_bad_arch_list_is_reported(monkeypatch):
    monkeypatch.setattr(build, "_loaded", {})
    if build.find_cuda_home() is None or torch.version.cuda is None:
        pytest.skip("needs nvcc and a CUDA build of torch")
    result = runner.invoke(app, ["doctor", "--build-ops", "--arch", "sm_eighty"])
    assert result.exit_code == 1 and "unsupported entry" in result.output


def test_the_demo_next_steps_name_real_commands_and_options():
    """The demo's closing rows tell a user what to type next: every command and --option
    in them exists (they would rot silently otherwise)."""
    from frozenseg.demo import NEXT_STEPS

    for _, line in NEXT_STEPS:
        words = line.split()
        assert words[0] == "frozenseg"
        result = runner.invoke(app, [words[1], "--help"], terminal_width=200)
        assert result.exit_code == 0, line
        for option in (w for w in words if w.startswith("--")):
            assert option in result.output, (line, option)


def test_recipes_are_listed_and_found_by_name():
    listed = runner.invoke(app, ["recipes"], terminal_width=200)
    assert listed.exit_code == 0
    for name in ("mask_frozen_hdetr_r50", "ablations/table1_training_free"):
        assert name in listed.output
    typo = runner.invoke(app, ["train", "mask_frozen_hdetr_r5", "--dry-run"])
    assert typo.exit_code == 1 and "did you mean mask_frozen_hdetr_r50" in typo.output
    found = runner.invoke(app, ["train", "mask_frozen_hdetr_r50", "--dry-run"])
    assert found.exit_code == 1 and "detectors/hdetr_r50: not a detector folder" in found.output
