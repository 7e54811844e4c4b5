"""load_checkpoint: real checkpoint layouts load exactly; nothing in a file runs unless trusted."""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import pathlib
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from frozenseg.checkpoint import SAFE_GLOBALS, CheckpointError, LoadedCheckpoint, load_checkpoint


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "backbone.0.body.conv1.weight": torch.randn(8, 3, 7, 7, generator=g),
        "transformer.level_embed": torch.randn(4, 256, generator=g).half(),
        "class_embed.0.bias": torch.randn(91, generator=g),
        "backbone.0.body.bn1.num_batches_tracked": torch.tensor(7),
        "label_enc.mask": torch.tensor([True, False, True]),
    }


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key


def _dino_args(**extra) -> argparse.Namespace:
    return argparse.Namespace(lr=1e-4, num_queries=900, backbone="resnet50", lr_drop_list=[33, 45],
                              dn_number=100, output_dir="logs/DINO/R50-MS4", **extra)


def _optimizer_state() -> dict:
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=1e-4)
    param.sum().backward()
    opt.step()
    return opt.state_dict()


def _error(path, **kwargs) -> str:
    """The CheckpointError message for path, checked to be one line naming the file."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert pathlib.Path(path).name in message
    assert "\n" not in message and "\r" not in message
    error = info.value  # raised on its own, not chained to a traceback from inside torch
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return message


# --- layouts that load ------------------------------------------------------------------------


def test_dino_style_checkpoint_loads_weights_and_args(tmp_path):
    sd, args = _state_dict(), _dino_args()
    path = tmp_path / "checkpoint0011.pth"
    torch.save({"model": sd, "optimizer": _optimizer_state(), "lr_scheduler": {"last_epoch": 11},
                "epoch": 11, "args": args}, path)
    ckpt = load_checkpoint(str(path))
    assert isinstance(ckpt, LoadedCheckpoint)
    _assert_same(ckpt.state_dict, sd)
    assert ckpt.args == vars(args) and type(ckpt.args) is dict
    assert ckpt.kind == "pickle" and ckpt.path == path


def test_result_is_frozen(tmp_path):
    torch.save({"model": _state_dict()}, tmp_path / "a.pth")
    ckpt = load_checkpoint(tmp_path / "a.pth")
    with pytest.raises(AttributeError):
        ckpt.kind = "safetensors"


def test_dataparallel_module_prefix_is_stripped(tmp_path):
    sd = _state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "dp.pth")
    _assert_same(load_checkpoint(tmp_path / "dp.pth").state_dict, sd)


def test_module_prefix_kept_unless_every_key_has_it(tmp_path):
    sd = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    torch.save(sd, tmp_path / "mixed.pth")
    assert set(load_checkpoint(tmp_path / "mixed.pth").state_dict) == {"module.a", "b"}


def test_bare_state_dict_loads(tmp_path):
    sd = _state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ckpt = load_checkpoint(tmp_path / "pytorch_model.bin")
    _assert_same(ckpt.state_dict, sd)
    assert ckpt.args is None


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_state_dict_nesting_loads(tmp_path, key):
    sd = _state_dict()
    torch.save({key: sd, "epoch": 3}, tmp_path / "nested.pth")
    _assert_same(load_checkpoint(tmp_path / "nested.pth").state_dict, sd)


def test_model_key_is_preferred_over_state_dict(tmp_path):
    model, other = {"w": torch.zeros(2)}, {"v": torch.ones(2)}
    torch.save({"state_dict": other, "model": model}, tmp_path / "both.pth")
    _assert_same(load_checkpoint(tmp_path / "both.pth").state_dict, model)


def test_non_tensor_entries_in_state_dict_are_dropped(tmp_path):
    sd = _state_dict()
    torch.save({"model": {**sd, "_version": 2}}, tmp_path / "extra.pth")
    _assert_same(load_checkpoint(tmp_path / "extra.pth").state_dict, sd)


def test_plain_dict_args_stay_a_dict(tmp_path):
    args = {"lr": 2e-4, "epochs": 12}
    torch.save({"model": _state_dict(), "args": args}, tmp_path / "d.pth")
    assert load_checkpoint(tmp_path / "d.pth").args == args


def test_legacy_non_zip_format_loads(tmp_path):
    sd = _state_dict()
    torch.save({"model": sd, "args": _dino_args()}, tmp_path / "old.pth",
               _use_new_zipfile_serialization=False)
    _assert_same(load_checkpoint(tmp_path / "old.pth").state_dict, sd)


def test_safetensors_loads(tmp_path):
    sd = _state_dict()
    save_file({f"module.{k}": v for k, v in sd.items()}, tmp_path / "model.safetensors")
    ckpt = load_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.kind == "safetensors" and ckpt.args is None
    _assert_same(ckpt.state_dict, sd)


@pytest.mark.parametrize("name", ["model.pth", "model.safetensors"])
def test_sha256_is_of_the_file_bytes(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(_state_dict(), path)
    else:
        torch.save({"model": _state_dict()}, path)
    assert load_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_numpy_scalars_and_paths_in_args_load(tmp_path):
    args = _dino_args(lr_backbone=np.float64(1e-5), weight_decay=np.float32(1e-4),
                      batch_size=np.int64(2), amp=np.bool_(True), seed=np.int32(42),
                      output_path=pathlib.Path("/runs/dino"))
    torch.save({"model": _state_dict(), "epoch": np.int64(11), "args": args}, tmp_path / "np.pth")
    loaded = load_checkpoint(tmp_path / "np.pth").args
    assert loaded == vars(args)
    for key in ("lr_backbone", "weight_decay", "batch_size", "amp", "seed", "output_path"):
        assert type(loaded[key]) is type(vars(args)[key]), key


def test_numpy1_and_python313_global_names_load(tmp_path):
    """Checkpoints written under numpy 1.x (numpy.core) or Python 3.13 (pathlib._local) load."""
    path = tmp_path / "old_names.pth"
    args = argparse.Namespace(lr=np.float64(0.5), out=pathlib.Path("/runs/x"))
    torch.save({"model": _state_dict(), "args": args}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    for new, old in ((b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n"),
                     (b"cpathlib\nPosixPath\n", b"cpathlib._local\nPosixPath\n")):
        if new in data:  # numpy 2 wrote the new name; rewrite it to the other spelling
            data = data.replace(new, old)
    assert b"numpy.core.multiarray\nscalar" in data and b"pathlib._local\nPosixPath" in data
    path.write_bytes(data)
    assert load_checkpoint(path).args == vars(args)


def test_loading_leaves_torch_safe_globals_as_they_were(tmp_path):
    torch.save({"model": _state_dict(), "args": _dino_args()}, tmp_path / "a.pth")
    with torch.serialization.safe_globals([argparse.Namespace]):
        before = set(torch.serialization.get_safe_globals())
        load_checkpoint(tmp_path / "a.pth")
        assert set(torch.serialization.get_safe_globals()) == before
    assert not set(SAFE_GLOBALS) & set(torch.serialization.get_safe_globals())


# --- nothing runs unless trusted --------------------------------------------------------------


def _write_marker(marker: str) -> collections.OrderedDict:
    """What the hostile pickle calls on load: leaves a file behind, returns a harmless dict."""
    pathlib.Path(marker).write_text("ran")
    return collections.OrderedDict(ran=True)


class _MarkerPayload:
    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


class _ShellPayload:
    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_global_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"model": _state_dict(), "args": {"lr": 1e-4, "hook": _MarkerPayload(marker)}},
               path)
    message = _error(path)
    assert f"needs the Python global '{_write_marker.__module__}._write_marker'" in message
    assert "--trust-checkpoint" in message and "trust=True" in message
    assert not marker.exists()


def test_os_system_payload_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "shell.pth"
    torch.save({"model": _state_dict(), "extra": _ShellPayload(marker)}, path)
    message = _error(path)
    assert f"global '{os.system.__module__}.system'" in message and "--trust-checkpoint" in message
    assert not marker.exists()


def test_trusted_file_runs_its_code_and_loads(tmp_path):
    marker, path, sd = tmp_path / "ran", tmp_path / "trusted.pth", _state_dict()
    torch.save({"model": sd, "args": {"lr": 1e-4, "hook": _MarkerPayload(marker)}}, path)
    _error(path)
    assert not marker.exists()
    ckpt = load_checkpoint(path, trust=True)
    assert marker.read_text() == "ran"
    assert ckpt.args == {"lr": 1e-4, "hook": collections.OrderedDict(ran=True)}
    _assert_same(ckpt.state_dict, sd)


def test_whole_pickled_module_needs_trust(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save(model, tmp_path / "whole.pth")
    assert "global 'torch.nn.modules.linear.Linear'" in _error(tmp_path / "whole.pth")
    _assert_same(load_checkpoint(tmp_path / "whole.pth", trust=True).state_dict,
                 model.state_dict())


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_protocol_4_needs_trust(tmp_path, zip_format):
    """torch's safe unpickler has no FRAME opcode: such files are refused, not misdiagnosed."""
    sd, path = _state_dict(), tmp_path / "p4.pth"
    torch.save({"model": sd}, path, pickle_protocol=4, _use_new_zipfile_serialization=zip_format)
    message = _error(path)
    assert "refused to load" in message and "--trust-checkpoint" in message
    _assert_same(load_checkpoint(path, trust=True).state_dict, sd)


def test_trusted_file_needing_missing_code_says_so(tmp_path):
    path = tmp_path / "needs_code.pth"
    torch.save({"model": _state_dict(), "extra": _MarkerPayload(tmp_path / "m")}, path,
               _use_new_zipfile_serialization=False)
    needle = f"c{_write_marker.__module__}\n_write_marker\n".encode()
    data = path.read_bytes()
    assert needle in data
    path.write_bytes(data.replace(needle, b"cno_such_training_repo.util\n_write_marker\n"))
    assert "no_such_training_repo.util._write_marker" in _error(path)
    message = _error(path, trust=True)
    assert "not importable" in message and "no_such_training_repo" in message


def test_numpy_arrays_load_from_their_bytes(tmp_path):
    """mmengine's message hub keeps numpy arrays; they are rebuilt from bytes and a dtype."""
    torch.save({"model": _state_dict(), "args": {"mean": np.arange(3.0)}}, tmp_path / "arr.pth")
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "arr.pth").args["mean"],
                                  np.arange(3.0))


def test_getattr_in_a_pickle_looks_nothing_up(tmp_path):
    """mmengine's HistoryBuffer pickles bound methods as getattr(buffer, name); the stand-in
    returns the name, so a pickle cannot reach an attribute through it."""
    torch.save({"model": _state_dict(), "args": {"method": np.zeros(1).sum}}, tmp_path / "g.pth")
    assert load_checkpoint(tmp_path / "g.pth").args["method"] == "sum"


# --- bad input: one line naming the file -------------------------------------------------------


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.pth")


def test_directory(tmp_path):
    (tmp_path / "ckpt_dir").mkdir()
    assert "directory" in _error(tmp_path / "ckpt_dir")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").touch()
    assert "empty" in _error(tmp_path / "empty.pth")


@pytest.mark.parametrize("trust", [False, True])
def test_text_file_is_not_a_checkpoint(tmp_path, trust):
    (tmp_path / "notes.pth").write_text("lr: 1e-4\nepochs: 12\n")
    assert "not a PyTorch checkpoint" in _error(tmp_path / "notes.pth", trust=trust)


def test_utf8_text_cut_mid_character_is_still_text(tmp_path):
    (tmp_path / "readme.pth").write_text("x" + "é" * 40, encoding="utf-8")
    assert "text file" in _error(tmp_path / "readme.pth")


def test_binary_junk_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(bytes([1, 2, 3, 250, 251]) * 50)
    assert "not a PyTorch checkpoint" in _error(tmp_path / "junk.pth")


@pytest.mark.parametrize("trust", [False, True])
def test_png_is_not_a_checkpoint(tmp_path, trust):
    (tmp_path / "image.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    message = _error(tmp_path / "image.pth", trust=trust)
    assert "not a PyTorch checkpoint" in message and "PNG" in message


@pytest.mark.parametrize("trust", [False, True])
def test_truncated_zip_checkpoint(tmp_path, trust):
    full, half = tmp_path / "full.pth", tmp_path / "half.pth"
    torch.save({"model": _state_dict(), "args": _dino_args()}, full)
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert "truncated" in _error(half, trust=trust)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_truncated_legacy_checkpoint(tmp_path, cut):
    full, part = tmp_path / "full.pth", tmp_path / "part.pth"
    torch.save({"model": _state_dict()}, full, _use_new_zipfile_serialization=False)
    part.write_bytes(full.read_bytes()[: int(full.stat().st_size * cut)])
    assert "truncated" in _error(part)


def test_plain_pickle_is_not_a_torch_checkpoint(tmp_path):
    import pickle

    (tmp_path / "R-50.pkl").write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}))
    assert "not a checkpoint written by torch.save" in _error(tmp_path / "R-50.pkl")


def test_zip_that_is_not_a_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "weights.pth", "w") as z:
        z.writestr("readme.txt", "not weights")
    assert "not a PyTorch checkpoint" in _error(tmp_path / "weights.pth")


def test_pickle_without_tensors_lists_its_keys(tmp_path):
    torch.save({"epoch": 11, "args": _dino_args(), "best_map": 0.49}, tmp_path / "meta.pth")
    message = _error(tmp_path / "meta.pth")
    assert "no state dict found" in message
    assert all(repr(k) in message for k in ("epoch", "args", "best_map"))


def test_pickle_holding_a_list(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert "no state dict found" in _error(tmp_path / "list.pth")


def test_bad_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert "not a valid safetensors file" in _error(tmp_path / "model.safetensors")


def test_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)
