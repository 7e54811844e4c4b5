"""Mask DINO joint mode: DINO plus a mask branch, trained whole (paper: mask-dino.txt)."""
