"""Files frozenseg ships: the demo's detector (``synth_dino.pth``, a tiny DINO trained on
the synthetic shapes, in the official DINO layout) and its head recipe (``demo.yaml``)."""
