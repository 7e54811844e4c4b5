import os

# Tests never reach a model hub: everything they load, they make.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
