"""How much memory a Mask DINO recipe needs: the estimate ``frozenseg train --dry-run``
prints before a long run is started on one GPU.

Weights, gradients and AdamW's two moments are 16 bytes per parameter (fp32; autocast
keeps the master weights in fp32). Activations depend on the images, the queries and
the switches (bf16, checkpointing), so they are measured: one training step on a real
batch of the recipe, on the GPU (peak allocated memory). On a CPU only the first part
is known.
"""

from __future__ import annotations

import torch

_BYTES_PER_PARAMETER = 16  # weight + gradient + two Adam moments, fp32


def training_memory(task) -> str:
    """One line: the parameter-state memory, and a measured training step's peak on a GPU."""
    params = sum(p.numel() for p in task.model.parameters())
    states = params * _BYTES_PER_PARAMETER / 2**30
    if not torch.cuda.is_available():
        return (f"memory: {states:.2f} GiB for weights, gradients and AdamW states; "
                "activations are measured on a GPU (run --dry-run there)")
    peak = _measured_step(task)
    return (f"memory: {states:.2f} GiB for weights, gradients and AdamW states; one training "
            f"step at batch {task.recipe.train.batch_size} peaked at {peak:.2f} GiB")


def _measured_step(task) -> float:
    """Peak GiB allocated by one forward + backward on the first full batch."""
    recipe, device = task.recipe, torch.device("cuda")
    model = task.model.to(device).train()
    task.device = device
    items = [task.dataset[i] for i in range(min(recipe.train.batch_size, len(task.dataset)))]
    batch = task.batch(task.collate(items))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.precision)
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        losses = task.losses(model, batch, torch.Generator(device="cpu").manual_seed(0))
    losses["loss"].backward()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() / 2**30
