"""The mode-neutral engine: the training loop and its task interface, training data,
inference, export."""
