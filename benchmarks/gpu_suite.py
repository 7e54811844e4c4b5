"""Every GPU figure the README and BENCHMARKS.md leave open, in one command.

The day a GPU is lent (about 8 minutes on one H100)::

    pip install -e . --no-deps && python benchmarks/gpu_suite.py --out gpu_suite

On the CPU, to check that the suite itself runs (tiny sizes, a minute or two)::

    python benchmarks/gpu_suite.py --smoke --out /tmp/gpu_suite

Each step is one of the benchmarks here (or ``frozenseg train --dry-run``, which measures
a joint-mode training step's peak memory on a GPU), run in its own process with a time
limit, so a crash or an out-of-memory in one step loses nothing of the others. After
every step the suite rewrites, atomically, ``OUT/gpu_suite.json`` (per step: command,
exit code, seconds, output) and ``OUT/gpu_suite.md`` (each step's output under its name,
the tables as the benchmarks print them), ready to be copied into BENCHMARKS.md.

Steps (GPU sizes; ``--smoke`` shrinks each):
  op                  the op's back ends (CUDA kernel fp32/bf16, Triton, fallback, the
                      original kernel where importable) at E1, D1, M1
  detector            the frozen detector's forward, ResNet-50 and Swin-L, 4 scales
  cache-batch{2,4,8}  cache write/read, and a head training step (the Swin-L recipe's
                      head) from the cache vs live, at batch 2, 4, 8
  joint-batch{1,2,4}  Mask DINO (the tiny joint recipe): one training step's peak memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JOINT_RECIPE = ROOT / "recipes" / "maskdino_synth_tiny.yaml"


@dataclass
class Step:
    name: str
    command: list[str]  # run in the work folder
    smoke: list[str]  # the same at CPU smoke size
    limit_s: int = 120  # on the GPU
    result: dict = field(default_factory=dict)


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / name), *args]


def steps() -> list[Step]:
    tiny_run = ["--repeats", "1", "--warmup", "0"]
    op_cases = "kernel-fp32,kernel-bf16,triton-fp32,fallback-fp32,original-fp32"
    suite = [
        Step("op", _script("ms_deform_attn.py", "--cases", op_cases),
             _script("ms_deform_attn.py", "--shapes", "D1", "--cases", "fallback-fp32",
                     "--batch", "1", *tiny_run), limit_s=150),
        Step("detector", _script("detector.py"),
             _script("detector.py", "--configs", "r50-4scale", "--size", "64", "96",
                     *tiny_run), limit_s=90),
    ]
    for batch in (2, 4, 8):
        suite.append(Step(
            f"cache-batch{batch}",
            _script("cache.py", "--batch", str(batch), "--images", str(2 * batch),
                    "--dtypes", "fp16"),
            _script("cache.py", "--batch", "1", "--images", "1", "--dtypes", "fp16",
                    "--scale", "0.1", *tiny_run), limit_s=60))
    for batch in (1, 2, 4):
        train = [sys.executable, "-m", "frozenseg", "train", str(JOINT_RECIPE), "--dry-run",
                 f"train.batch_size={batch}"]
        suite.append(Step(f"joint-batch{batch}", train, train, limit_s=45))
    return suite


def run(step: Step, *, smoke: bool, work: Path) -> dict:
    """The step's process, its output kept whatever happens to it."""
    command = step.smoke if smoke else step.command
    limit = step.limit_s * (3 if smoke else 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), str(HERE), os.environ.get("PYTHONPATH")]))}
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run checks the suite, on the CPU
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                              timeout=limit)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code = "timeout"
        output = _text(err.stdout) + _text(err.stderr) + f"\n(stopped after {limit} s)"
    return {"command": command, "exit": code, "seconds": round(time.perf_counter() - start, 1),
            "output": output}


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def markdown(suite: list[Step]) -> str:
    parts = ["# GPU suite\n"]
    for step in suite:
        if not step.result:
            continue
        r = step.result
        parts.append(f"## {step.name}\n\nexit {r['exit']}, {r['seconds']} s: "
                     f"`{' '.join(r['command'][1:])}`\n\n```\n{r['output'].strip()}\n```\n")
    return "\n".join(parts)


def write(out: Path, suite: list[Step]) -> None:
    from frozenseg.files import atomic_write_text

    results = [{"name": s.name, **s.result} for s in suite if s.result]
    atomic_write_text(out / "gpu_suite.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "gpu_suite.md", markdown(suite))


def prepare(work: Path) -> None:
    """The synthetic data the joint recipe reads (relative paths, from the work folder)."""
    subprocess.run([sys.executable, "-m", "frozenseg", "synth", "--out", "synth", "--images",
                    "16", "--seed", "0"], cwd=work, check=True, capture_output=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_suite"), help="results folder")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--steps", help="comma-separated step names (default: all)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    suite = steps()
    if args.steps:
        wanted = set(args.steps.split(","))
        unknown = wanted - {s.name for s in suite}
        if unknown:
            sys.exit(f"unknown steps: {', '.join(sorted(unknown))}")
        suite = [s for s in suite if s.name in wanted]
    work = args.out.resolve() / "work"
    work.mkdir(parents=True, exist_ok=True)
    if any(s.name.startswith("joint") for s in suite):
        prepare(work)
    for step in suite:
        print(f"{step.name} ...", file=sys.stderr, flush=True)
        step.result = run(step, smoke=args.smoke, work=work)
        write(args.out, suite)
        print(f"{step.name}: exit {step.result['exit']} in {step.result['seconds']} s",
              file=sys.stderr, flush=True)
    return 0 if all(s.result["exit"] == 0 for s in suite) else 1


if __name__ == "__main__":
    sys.exit(main())
