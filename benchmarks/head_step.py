"""The head's training step with each distinct query computed once, against every row.

A detector that ranks (query, class) pairs (DINO and most since) reports one query under
several classes: the same box and hidden state, so the same mask. The head computes each
distinct query once (``frozenseg.head.network.distinct_queries``); this times the demo's
head training on a demo folder's feature cache both ways, interleaved (same machine,
same load), and checks that the losses agree.

Run (after ``frozenseg demo --out WORK``):
    python -m benchmarks.head_step --demo WORK --steps 30 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_name, table
from frozenseg.demo import demo_recipe
from frozenseg.engine.train import Trainer
from frozenseg.head import network
from frozenseg.recipe import recipe_from_dict, recipe_to_dict


def timed_run(demo: Path, steps: int, out: Path, distinct: bool) -> tuple[float, float]:
    """(seconds per step, last logged loss) of ``steps`` steps of the demo's head."""
    data = recipe_to_dict(demo_recipe(demo, steps))
    data["train"].update(output_dir=str(out), checkpoint_every=10 * steps)
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(recipe_from_dict(data, "demo recipe"), evaluate=False,
                      log=lambda line: None)
    original = network.distinct_queries
    if not distinct:
        network.distinct_queries = lambda selection: None
    try:
        started = time.perf_counter()
        trainer.run(resume=False)
        seconds = (time.perf_counter() - started) / steps
    finally:
        network.distinct_queries = original
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    return seconds, json.loads(last)["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a frozenseg demo folder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            once, loss_once = timed_run(args.demo, args.steps, Path(work) / "once", True)
            each, loss_each = timed_run(args.demo, args.steps, Path(work) / "each", False)
            ratios.append(each / once)
            rows.append([r + 1, f"{once:.3f}", f"{each:.3f}", f"{each / once:.2f}",
                         f"{loss_once:.6f}", f"{loss_each:.6f}"])
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.steps} steps per run")
    print(table(["round", "s/step once", "s/step each row", "speed-up", "loss once",
                 "loss each row"], rows))
    print(f"speed-up, mean of {len(ratios)}: {sum(ratios) / len(ratios):.2f}")


if __name__ == "__main__":
    main()
