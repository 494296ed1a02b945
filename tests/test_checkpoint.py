import pytest
import torch

from mimkit.errors import MimkitError
from mimkit.train import checkpoint as ck


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    state = ck.make_checkpoint(method_name="mae", config={"train": {"epochs": 1}}, student={"w": torch.ones(3)},
                               teacher=None, optimizer={"state": {}, "param_groups": []}, scaler=None,
                               global_step=7, epoch=1)
    path = tmp_path / "c.pt"
    ck.atomic_save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 7 and torch.equal(loaded["student"]["w"], torch.ones(3))
    assert ck.load_checkpoint(path)["method"] == "mae"


def test_rng_state_round_trip():
    import random

    import numpy as np

    s = ck.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ck.set_rng_state(s)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_crash_during_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.atomic_save({"format": ck.FORMAT, "v": torch.tensor(1)}, path)
    before = path.read_bytes()

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save({"format": ck.FORMAT, "v": torch.tensor(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_foreign_checkpoint_is_refused(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"model": {}}, p)
    with pytest.raises(MimkitError, match="not a mimkit checkpoint"):
        ck.load_checkpoint(p)
