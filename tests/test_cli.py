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


@pytest.mark.build
@pytest.mark.slow
@needs_nvcc
def test_a_compile_error_fails_build_ops_with_the_compilers_first_error(tmp_path, monkeypatch):
    sources = tmp_path / "cuda"
    shutil.copytree(build.source_dir(), sources)
    kernel = sources / "ms_deform_attn_kernel.cu"
    kernel.write_text(kernel.read_text() + "\nstatic int broken = undeclared_name;\n")
    monkeypatch.setattr(build, "source_dir", lambda: sources)
    monkeypatch.setenv("FROZENSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_loaded", {})
    result = runner.invoke(app, ["doctor", "--build-ops", "--arch", "8.0"])
    assert result.exit_code == 1
    assert "undeclared_name" in result.output and "FAIL" in result.output


@pytest.mark.build
@pytest.mark.slow
@needs_nvcc
def test_an_architecture_nvcc_does_not_know_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FROZENSEG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", {})
    result = runner.invoke(app, ["doctor", "--build-ops", "--arch", "99.0"])
    assert result.exit_code == 1
    assert "Unsupported gpu architecture" in " ".join(result.output.split())


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
