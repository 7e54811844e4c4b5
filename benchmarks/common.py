"""What every benchmark here shares: timing, the machine's name, the markdown table."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

MIB = 1 << 20


def elapsed(fn, device: torch.device) -> float:
    """Seconds fn() takes (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return "CPU"


def device_line(device: torch.device, args, memory_note: str) -> str:
    """Header line: the device, torch, the exact command and how figures were taken."""
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        name = f"{cpu_name()} ({torch.get_num_threads()} threads)"
    command = shlex.join(["python", *sys.argv])
    return (
        f"device: {name}, torch {torch.__version__}, command: `{command}`, "
        f"median of {args.repeats} after {args.warmup} warm-up; {memory_note}"
    )


def table(header, rows) -> str:
    """A markdown table, columns padded to line up."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    cells = [[str(c).ljust(w) for c, w in zip(r, widths, strict=True)] for r in [header, *rows]]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--repeats, --warmup, --device: what every benchmark takes."""
    parser.add_argument("--repeats", type=int, help="default 20 on CUDA, 3 on CPU")
    parser.add_argument("--warmup", type=int, help="default 3 on CUDA, 1 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def resolve_run_arguments(args) -> torch.device:
    """Fill the device-dependent defaults of add_run_arguments; returns the device."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.repeats = args.repeats or (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    return device


def learning_curve(trainer, marks: list[float], cells, columns: list[str]) -> list[list]:
    """Train; at each mark (minutes of training, evaluation not counted) evaluate with the
    task's own evaluation. Rows: minutes, step, then ``cells(metrics)``; each row is
    printed as it comes."""
    import time
    from pathlib import Path

    model = trainer.accelerator.unwrap_model(trainer.model)
    out = Path(trainer.recipe.train.output_dir) / "eval"
    rows, clock = [], {"train": 0.0, "last": time.perf_counter()}

    def on_step(record: dict) -> None:
        clock["train"] += time.perf_counter() - clock["last"]
        if marks and clock["train"] >= 60 * marks[0]:
            metrics, _, _ = trainer.task.evaluate(model, out)
            rows.append([f"{clock['train'] / 60:.1f}", record["step"], *cells(metrics)])
            print(table(columns, rows[-1:]), flush=True)
            marks.pop(0)
            if not marks:
                raise StopIteration
        clock["last"] = time.perf_counter()

    try:
        trainer.run(progress=on_step)
    except StopIteration:
        pass
    return rows
