"""Reference fixtures for the legacy (pre-1.6, non-zip) torch.save format (backbone crate).

Every .pth here is written by torch itself (`torch.save(..., _use_new_zipfile_serialization=False)`,
the layout of `torch.serialization._legacy_save`) except storage_views.pth / big_endian.pth, which
are written by hand in that layout because torch >= 0.4 no longer writes storage views; what
`torch.load` returns for storage_views.pth is the expected value. Written to
backbone/tests/fixtures/legacy/ (a few KB in all):

  state_dict.pth             an nn.Module state_dict (an OrderedDict with `_metadata`, incl. the
                             0-d int64 `num_batches_tracked`) plus `extra.*`: float32 tensors of
                             several shapes (a 0-d one), views sharing one storage (storage offset,
                             strides, transposed), an int64 and a float16 tensor
  expected.safetensors       the same tensors, contiguous (the expected values)
  nested.pth                 mmcv-style {'meta': {...}, 'state_dict': the same, 'optimizer': {...}}
                             plus an argparse.Namespace, as old training scripts saved
  truncated.pth              state_dict.pth cut inside its last storage's bytes
  foreign_class.pth          a state dict with a collections.Counter entry (a class no state dict
                             uses), which must be refused by name
  storage_views.pth          storages with view_metadata (torch <= 0.3 wrote these) and 'cuda:0'
                             locations
  storage_views.safetensors  torch.load(storage_views.pth, map_location='cpu')
  big_endian.pth             storage_views.pth with sys_info little_endian=False
  meta.json                  the truncated file's last storage (key, bytes needed / available)
"""
import argparse
import collections
import json
import os
import pickle
import struct
import sys
import warnings

import torch
import torch.nn as nn
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "backbone", "tests", "fixtures", "legacy")

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def legacy_save(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def state_dict():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(4, 2))
    with torch.no_grad():
        m[1].running_mean.copy_(torch.randn(3, generator=g))
        m[1].running_var.copy_(torch.rand(3, generator=g) + 0.5)
        m[1].num_batches_tracked.fill_(7)
    sd = m.state_dict()
    assert isinstance(sd, collections.OrderedDict) and hasattr(sd, "_metadata")
    base = torch.randn(4, 6, generator=g)
    sd["extra.scalar"] = torch.tensor(2.5)
    sd["extra.base"] = base
    sd["extra.rows"] = base[1:3]  # storage offset 6, same storage as extra.base
    sd["extra.cols"] = base[:, 1::2]  # offset 1, strides (6, 2)
    sd["extra.t"] = base.t()  # strides (1, 6)
    sd["extra.int64"] = torch.tensor([1, -2, 3_000_000_000])
    sd["extra.half"] = torch.randn(3, generator=g).half()
    assert sd["extra.cols"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    return sd


def read_legacy_layout(path):
    """Walks a legacy file as torch._legacy_load does; returns [(key, byte of its count, nbytes)]."""
    decls = {}

    class Reader(pickle.Unpickler):
        def persistent_load(self, pid):
            _, storage_type, key, _location, numel, _view = pid
            decls[key] = (numel, torch._utils._element_size(storage_type.dtype))
            return None

        def find_class(self, module, name):
            if module == "torch._utils":
                return lambda *a: None
            return super().find_class(module, name)

    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation (storage_type.dtype)
        for _ in range(3):
            pickle.load(f)
        Reader(f).load()
        keys = pickle.load(f)
        out = []
        for key in keys:
            pos = f.tell()
            (count,) = struct.unpack("<q", f.read(8))
            numel, elt = decls[key]
            assert count == numel, (key, count, numel)
            f.seek(numel * elt, 1)
            out.append((key, pos, numel * elt))
        assert f.tell() == os.path.getsize(path), "storages should end the file"
    return out


class FakeStorage:
    """A storage as the legacy persistent id describes it (written by ViewPickler)."""

    def __init__(self, storage_type, key, location, values, view=None):
        self.storage_type, self.key, self.location, self.values, self.view = (
            storage_type,
            key,
            location,
            values,
            view,
        )


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class ViewPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, obj.location, obj.values.numel(), obj.view)
        return None


def write_by_hand(path, little_endian=True):
    """The legacy layout with storage views, written the way torch <= 0.3 did."""
    root = torch.arange(20, dtype=torch.float32) * 0.5 - 3.0
    longs = torch.tensor([5, -6, 7, 1 << 40])
    r = lambda view=None: FakeStorage(torch.FloatStorage, "1000", "cuda:0", root, view)
    l = FakeStorage(torch.LongStorage, "2000", "cpu", longs)
    obj = collections.OrderedDict(
        [
            ("root", FakeTensor(r(), 0, (4, 5), (5, 1))),
            # view '1001' = root[4:12]; the tensor's offset/stride are relative to the view
            ("in_view", FakeTensor(r(("1001", 4, 8)), 2, (2, 3), (1, 2))),
            ("view_whole", FakeTensor(r(("1002", 12, 8)), 0, (8,), (1,))),
            ("view_scalar", FakeTensor(r(("1002", 12, 8)), 7, (), ())),
            ("longs", FakeTensor(l, 1, (3,), (1,))),
        ]
    )
    sys_info = dict(
        protocol_version=PROTOCOL_VERSION,
        little_endian=little_endian,
        type_sizes=dict(short=2, int=4, long=8),
    )
    with open(path, "wb") as f:
        pickle.dump(MAGIC_NUMBER, f, protocol=2)
        pickle.dump(PROTOCOL_VERSION, f, protocol=2)
        pickle.dump(sys_info, f, protocol=2)
        ViewPickler(f, protocol=2).dump(obj)
        keys = ["1000", "2000"]
        pickle.dump(keys, f, protocol=2)
        for t in (root, longs):
            f.write(struct.pack("<q", t.numel()))
            f.write(t.numpy().tobytes())


def main():
    os.makedirs(OUT, exist_ok=True)
    sd = state_dict()
    p = os.path.join(OUT, "state_dict.pth")
    legacy_save(sd, p)
    save_file(
        {k: v.detach().clone().contiguous() for k, v in sd.items()},
        os.path.join(OUT, "expected.safetensors"),
    )
    # torch itself must read back what we expect.
    back = torch.load(p, weights_only=True)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    g = torch.Generator().manual_seed(1)
    nested = {
        "meta": {"epoch": 3, "CLASSES": ("cat", "dog"), "env_info": "torch 1.1\nmmcv 0.2"},
        "state_dict": sd,
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.randn(5, generator=g)}},
            "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}],
        },
        "args": argparse.Namespace(lr=0.1, model="tiny"),
    }
    legacy_save(nested, os.path.join(OUT, "nested.pth"))

    data = open(p, "rb").read()
    layout = read_legacy_layout(p)
    last_key, last_pos, last_nbytes = layout[-1]
    cut = min(10, last_nbytes // 2)  # inside the last storage's bytes
    assert cut > 0
    with open(os.path.join(OUT, "truncated.pth"), "wb") as f:
        f.write(data[:-cut])

    foreign = collections.OrderedDict(
        [("w", torch.ones(2)), ("counts", collections.Counter({"a": 2, "b": 1}))]
    )
    legacy_save(foreign, os.path.join(OUT, "foreign_class.pth"))
    assert b"collections\nCounter" in open(os.path.join(OUT, "foreign_class.pth"), "rb").read()

    views = os.path.join(OUT, "storage_views.pth")
    write_by_hand(views)
    got = torch.load(views, map_location="cpu", weights_only=False)
    # The view offsets must have been honoured (root = arange(20) * 0.5 - 3).
    expect_in_view = (torch.arange(20.0) * 0.5 - 3.0).as_strided((2, 3), (1, 2), 4 + 2)
    assert torch.equal(got["in_view"], expect_in_view), got["in_view"]
    assert got["view_scalar"].item() == 19 * 0.5 - 3.0
    save_file(
        {k: v.clone().contiguous() for k, v in got.items()},
        os.path.join(OUT, "storage_views.safetensors"),
    )
    write_by_hand(os.path.join(OUT, "big_endian.pth"), little_endian=False)

    meta = {
        "truncated": {
            "storage": last_key,
            "count_at": last_pos,
            "needs": last_nbytes,
            "available": last_nbytes - cut,
        }
    }
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
