"""The ``frozenseg`` command line: thin wrappers that parse, then call the library."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

import frozenseg

app = typer.Typer(
    help="Turn a frozen DETR-family detector into an instance segmenter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"frozenseg {frozenseg.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """frozenseg: masks for the detector you already have."""


@app.command()
def doctor(
    build_ops: bool = typer.Option(
        False, "--build-ops",
        help="Compile the CUDA op even without a GPU; exit non-zero if compilation fails.",
    ),
    arch: str = typer.Option(
        None, "--arch",
        help="Compute capabilities to build for, e.g. '8.0;9.0' (default: TORCH_CUDA_ARCH_LIST, "
        "else the visible GPUs, else 8.0;9.0).",
    ),
) -> None:
    """Versions, GPU, and whether the deformable-attention kernel builds and agrees."""
    import torch

    from frozenseg import doctor as checks

    findings = checks.environment()
    has_gpu = torch.cuda.is_available()
    if build_ops or has_gpu:
        with console.status("Building the CUDA op (the first build takes a few minutes)..."):
            findings.append(checks.kernel_build(arch))
        if has_gpu and findings[-1].ok:
            findings.append(checks.kernel_agreement())
    else:
        findings.append(checks.Finding(
            "CUDA op build", "skipped: no GPU (frozenseg doctor --build-ops compiles it anyway); "
            "the PyTorch fallback is used"))
    table = Table(title="frozenseg doctor", show_header=False)
    marks = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: ""}
    for finding in findings:
        table.add_row(finding.name, finding.value, marks[finding.ok])
    console.print(table)
    failures = [f for f in findings if f.ok is False and f.name.startswith(("CUDA op", "kernel"))]
    for failure in failures:  # unwrapped, so the compiler's message can be copied whole
        console.print(f"[red]error:[/] {failure.name}: {failure.value}", soft_wrap=True)
    if failures:
        raise typer.Exit(code=1)
