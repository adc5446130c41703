"""What would make a GPU wait for the host, found on the CPU: the training steps (CE, GBG, BCL on
device views), an evaluation batch and a grouping pass run under a TorchDispatchMode that sees
every aten op, with the data, the model and everything computed from them marked as living on
"the device". On a GPU a step must read nothing back but the MGDA solve's Gram and losses (one
copy); here each op that would synchronise on CUDA is recorded with the function that ran it.

How "the device" is told from the host when everything is on the CPU:
- DEVICE is torch.device("cpu", 0): a factory given it, or a copy to it, shows that index in its
  aten call; the data set, the model and the groups are marked device-resident by the test; any
  op with a device input makes device outputs.
- Host tensors are those made from Python or numpy data (aten.lift_fresh: torch.tensor,
  as_tensor, from_numpy) and what is computed from them alone, and what .cpu() returns.
- A host tensor (not a 0-dim one: CUDA takes those as scalars without waiting) meeting a device
  tensor in an op is a copy from pageable host memory (or an error) on CUDA: recorded. So is a
  copy to DEVICE that does not go through gbg.to_device / data_lt.to_device (pinned memory and
  non_blocking on CUDA; tests/test_host_sync.py::test_to_device_pins_on_cuda checks they pin).
- Reads: .item() / int() / bool() / float() (aten._local_scalar_dense), .cpu(), .tolist(),
  .numpy() and __array__ of a device tensor; and the ops that size their output from the data
  (nonzero, bincount, unique*, masked_select, repeat_interleave without output_size, indexing
  with a boolean mask). numpy() and __array__ of a device tensor raise TypeError, as on CUDA
  (strict=True): the error train.make_sampler hit on its first GPU run.
"""
import argparse
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import weakref

import data_lt
import gbg
import train as T

aten = torch.ops.aten
DEVICE = torch.device("cpu", 0)
OURS = {"gbg.py", "train.py", "data_lt.py"}
# ops whose output size or value the host needs: on CUDA each waits for the device
SIZED_BY_DATA = {aten._local_scalar_dense, aten.nonzero, aten.bincount, aten._unique, aten._unique2, aten.unique_dim,
                 aten.unique_consecutive, aten.unique_dim_consecutive, aten.masked_select, aten.is_nonzero,
                 aten.equal}
BOOL_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _tensors(args, kwargs=None):
    """The tensors among an aten call's arguments (tensors, and lists of them) or in its output."""
    found = []
    for a in ((*args, *kwargs.values()) if kwargs is not None else args):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)) and a and not isinstance(a[0], (int, float, bool)):
            found.extend(t for t in a if isinstance(t, torch.Tensor))
    return found


def where():
    """file:function of the innermost frame in the project's modules."""
    for frame in reversed(traceback.extract_stack()):
        if Path(frame.filename).name in OURS:
            return f"{Path(frame.filename).name}:{frame.name}"
    return "?"


class HostSync(TorchDispatchMode):
    """Records (what, where) for every would-be synchronisation while active; see the top."""

    def __init__(self, strict=True):
        super().__init__()
        # marks by storage, so that views, their bases and writes through either share them
        self._dev, self._host, self.log, self.strict = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary(), [], strict
        self.patched, self.ops = [], set()  # ops: every aten op seen, by name

    # -- marking
    def is_dev(self, t):
        return t.untyped_storage() in self._dev

    def is_host(self, t):
        return t.untyped_storage() in self._host

    def on_device(self, *tensors):
        for t in tensors:
            self._host.pop(t.untyped_storage(), None)
            self._dev[t.untyped_storage()] = True
        return tensors[0] if len(tensors) == 1 else tensors

    def on_host(self, *tensors):
        for t in tensors:
            self._dev.pop(t.untyped_storage(), None)
            self._host[t.untyped_storage()] = True

    def _host_copy(self, t):
        out = t.clone() if self.is_dev(t) else t
        self.on_host(out)
        return out

    def note(self, what):
        self.log.append((what, where()))

    # -- aten ops
    def _syncs(self, func, args, kwargs):
        packet = func.overloadpacket
        if packet in SIZED_BY_DATA:
            return packet.__name__
        if packet is aten.repeat_interleave and func is not aten.repeat_interleave.self_int \
                and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        if packet in BOOL_INDEXING:
            index = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index):
                return "indexing with a boolean mask"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        dev_in = any(t.untyped_storage() in self._dev for t in tensors)
        host_in = any(t.dim() > 0 and t.untyped_storage() in self._host for t in tensors)
        packet = func.overloadpacket
        self.ops.add(packet.__name__)
        to_dev = kwargs.get("device") == DEVICE
        if dev_in:
            reason = self._syncs(func, args, kwargs)
            if reason:
                self.note(reason)
        if packet is aten._to_copy and to_dev and not dev_in:
            if not (kwargs.get("non_blocking") and where().endswith(":to_device")):
                self.note("a copy to the device not through to_device (pinned memory, non_blocking)")
        elif packet is aten.copy_ and self.is_host(args[0]) and self.is_dev(args[1]):
            self.note("copy_ from the device into host memory")
        elif dev_in and host_in:
            self.note(f"a host tensor used on the device ({packet.__name__}): a copy from pageable memory")
        out = func(*args, **kwargs)
        outs = _tensors(out if isinstance(out, (tuple, list)) else (out,))
        if dev_in or to_dev:
            for o in outs:
                self._dev[o.untyped_storage()] = True
        elif packet is aten.lift_fresh or any(t.untyped_storage() in self._host for t in tensors):
            self.on_host(*outs)
        return out

    # -- Python-level reads (on the CPU .cpu(), .tolist() and .numpy() dispatch nothing)
    def __enter__(self):
        rec = self

        def patch(owner, name, new):
            self.patched.append((owner, name, getattr(owner, name)))
            setattr(owner, name, new)

        def reading(name, original, numpy_like=False):
            def read(t, *a, **k):
                if rec.is_dev(t):
                    if numpy_like and rec.strict:
                        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to "
                                        "copy the tensor to host memory first. (tests/test_host_sync.py: a "
                                        "device-resident tensor)")
                    rec.note(f".{name}()")
                    if name == "cpu":
                        return rec._host_copy(t)
                return original(t, *a, **k)
            return read

        for name in ("cpu", "tolist"):
            patch(torch.Tensor, name, reading(name, getattr(torch.Tensor, name)))
        for name in ("numpy", "__array__"):
            patch(torch.Tensor, name, reading(name, getattr(torch.Tensor, name), numpy_like=True))
        original_to = torch.Tensor.to

        def to(t, *a, **k):  # .to("cpu") spelled out: a read; .to(x.device) is judged where it is used
            if rec.is_dev(t) and any(isinstance(v, str) and v.startswith("cpu") for v in (*a, *k.values())):
                rec.note(".to('cpu')")
                return rec._host_copy(original_to(t, *a, **k))
            return original_to(t, *a, **k)
        patch(torch.Tensor, "to", to)
        for module in (gbg, data_lt):  # the sanctioned way onto the device
            original = getattr(module, "to_device", None)
            if original is None:
                continue

            def sanctioned(t, device, _original=original):
                out = _original(t, device)
                if out is t and rec.is_host(t):
                    out = t.clone()
                return rec.on_device(out)
            patch(module, "to_device", sanctioned)
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        for owner, name, original in reversed(self.patched):
            setattr(owner, name, original)
        self.patched.clear()
        return out


# --- the harness itself ---------------------------------------------------------------------------

def test_the_harness_sees_what_would_synchronise():
    """Each kind of wait the harness claims to see, once, and what it must let through."""
    on_dev = torch.arange(6, device=DEVICE)
    rec = HostSync()
    rec.on_device(on_dev)
    with rec:
        with pytest.raises(TypeError, match="numpy"):
            np.asarray(on_dev)
        with pytest.raises(TypeError, match="numpy"):
            on_dev.numpy()
        int(on_dev[1]), on_dev.tolist(), on_dev.cpu().numpy()   # a read each; numpy() of the copy is fine
        torch.bincount(on_dev), on_dev[on_dev > 2], on_dev.nonzero()
        on_dev + torch.tensor([1, 2, 3, 4, 5, 6])                 # a host tensor on the device
        on_dev.new_zeros(6).to(DEVICE)                             # already there: nothing
        torch.tensor([1.0]).to(DEVICE)                             # a plain copy to the device
        host = torch.as_tensor(np.arange(6))
        moved = gbg.to_device(host, DEVICE) + on_dev + data_lt.to_device(host, DEVICE)  # the sanctioned way
        on_dev * torch.tensor(2)                                   # a 0-dim host tensor: a scalar, fine
        host * 2, torch.zeros(3).sum().item()                      # host work: fine
        torch.repeat_interleave(on_dev, 2), torch.repeat_interleave(on_dev, on_dev, output_size=15)  # fine
        torch.repeat_interleave(on_dev, on_dev)
    assert [what for what, _ in rec.log] == [
        "_local_scalar_dense", ".tolist()", ".cpu()", "bincount", "indexing with a boolean mask", "nonzero",
        "a host tensor used on the device (add): a copy from pageable memory",
        "a copy to the device not through to_device (pinned memory, non_blocking)",
        "repeat_interleave without output_size"]
    assert rec.is_dev(moved)


def test_to_device_pins_on_cuda(monkeypatch):
    """gbg.to_device and data_lt.to_device: host -> GPU through pinned memory, non_blocking (without a
    GPU: the calls they make, recorded); on the device already or on the CPU, the tensor itself."""
    for to_device in (gbg.to_device, data_lt.to_device):
        calls = []
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
        monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: calls.append((a, k)) or t)
        to_device(torch.zeros(2), "cuda")
        assert calls == ["pin", ((torch.device("cuda"),), {"non_blocking": True})]
        monkeypatch.undo()
        t = torch.zeros(2)
        assert to_device(t, "cpu") is t


# --- train.py's pieces on device-resident data ----------------------------------------------------

K, SIZE = 6, 8
COUNTS = [30, 16, 9, 6, 4, 3]


def make_args(**kw):
    args = dict(loss="ce", moo="mgda", moo_every=1, moo_grad="exact", moo_gram="all", normalize="l2",
                moo_update="scaled", bcl_group_loss="la", sampler="gac", la_weight=2.0, bcl_weight=1.6, bcl_temp=0.1,
                distributed=False, world_size=1, rank=0, amp=False, group_loss="class", ratio_every=1, lr=0.05,
                warmup_epochs=0, schedule="step", lr_drops=None, lr_gamma=0.1, epochs=10, print_freq=1000, output_dir="unused",
                batch_size=12, gac_fill=0.1, seed=0, num_groups=3, grouping="gbg", sketch_dim=64,
                grad_max_per_class=None, recalibrate_bn=True, workers=0, diag_batches=1, compile=False,
                ncut_assign="kmeans")
    args.update(kw)
    args.setdefault("augment", "release" if args["loss"] == "bcl" else "crop-flip")
    args.setdefault("class_balanced", False)
    return argparse.Namespace(**args)


def device_data(rec):
    """A tiny long-tailed TensorImages set on DEVICE, marked device-resident."""
    g = torch.Generator().manual_seed(0)
    train_y, test_y = np.repeat(np.arange(K), COUNTS), np.repeat(np.arange(K), 4)
    make = lambda n: torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    data = data_lt._tensor_data(make(len(train_y)), train_y, make(len(test_y)), test_y, K)
    data.train, data.test = data.train.to(DEVICE), data.test.to(DEVICE)
    data.train_eval = data.train
    rec.on_device(data.train.images, data.train.targets, data.test.images, data.test.targets)
    return data


def device_model(rec, bcl, data):
    torch.manual_seed(0)
    model = T.build_model("resnet8", K)
    if bcl:
        model = T.make_bcl_model(model, data.class_counts)
    model.to(DEVICE)
    rec.on_device(*model.parameters(), *model.buffers())
    return model


class Marked:
    """A loader whose batches leave a mark in the log: the records between marks are one step's."""

    def __init__(self, loader, rec):
        self.loader, self.rec, self.marks = loader, rec, []

    def __iter__(self):
        for batch in self.loader:
            self.marks.append(len(self.rec.log))
            yield batch

    def __len__(self):
        return len(self.loader)

    def per_batch(self):
        ends = self.marks[1:] + [len(self.rec.log)]
        return [self.rec.log[a:b] for a, b in zip(self.marks, ends)]


@pytest.fixture(scope="module")
def runs():
    """Under HostSync(strict), where numpy() of a device tensor raises as on CUDA, on device-resident
    data: a grouping pass (the CE model), the sampler, three steps each of CE, GBG, BCL and BCL+GBG
    (device views), an evaluation and the gradient diagnostic. Returns {what: records}."""
    rec, out = HostSync(strict=True), {}
    data = device_data(rec)
    groups = class_to_group = None
    for bcl in (False, True):
        model = device_model(rec, bcl, data)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        args = make_args(loss="bcl" if bcl else "ce")
        name = "bcl" if bcl else "ce"
        with rec:
            if groups is None:
                start = len(rec.log)
                groups, _, _ = T.make_groups(model, data, args, DEVICE)
                out["grouping"] = rec.log[start:]
                class_to_group = rec.on_device(torch.as_tensor(groups))
            for grouped in (False, True):
                start = len(rec.log)
                sampler = T.make_sampler(data, groups if grouped else None, args)
                sampler.set_epoch(0)
                out["sampler"] = rec.log[start:]
                batches = [b for b, _ in zip(sampler, range(3))]
                loader = Marked(data_lt.make_loader(data.train, batches, train=True, device=DEVICE, seed=1,
                                                    views="device" if bcl else None), rec)
                T.train_one_epoch(model, loader, optimizer, 0, args, class_to_group if grouped else None, DEVICE)
                out[f"steps_{name}{'_gbg' if grouped else ''}"] = loader.per_batch()
            if not bcl:
                batches = [list(range(i, i + 8)) for i in range(0, len(data.test), 8)]
                loader = Marked(data_lt.make_loader(data.test, batches, train=False, device=DEVICE), rec)
                T.evaluate(model, loader, data.class_counts, DEVICE, args)
                out["evaluate"] = loader.per_batch()
                out["diagnostic"] = T.gradient_diagnostic(model, T.diag_loader(data, groups, args, DEVICE),
                                                          class_to_group, data.class_counts, args, DEVICE)
    out["ops"] = rec.ops
    return out


def test_training_pieces_run_on_device_resident_data(runs):
    """The sampler, the grouping, the steps, the evaluation and the diagnostic never take numpy of a
    tensor on the device (on CUDA a TypeError: train.make_sampler's first GPU run ended there)."""
    assert runs["diagnostic"]["diag_cos"] and runs["sampler"] == [(".cpu()", "gbg.py:_dataset_labels")]


MGDA_READ = (".cpu()", "gbg.py:mgda_weights")


def test_only_the_mgda_solve_reads_the_device(runs):
    """Between the first and the last step (the progress line reads the device there): plain CE and
    BCL read nothing, a GBG step (CE or BCL, device views) reads the Gram and the losses once. An
    evaluation batch reads nothing; the per-class counts are read once, after the last batch. A
    grouping pass reads the device a fixed number of times, however many samples and batches it
    takes: gbg.class_gradients the labels, then the rows and its tallies; train.make_groups a few
    more on rank 0 (the affinity, the groups, their statistics)."""
    for name, want in (("ce", []), ("bcl", []), ("ce_gbg", [MGDA_READ]), ("bcl_gbg", [MGDA_READ])):
        steps = runs[f"steps_{name}"]
        assert len(steps) == 3 and steps[1] == want, (name, steps)
    evaluate = runs["evaluate"]
    assert len(evaluate) == 3 and evaluate[:2] == [[], []], evaluate
    assert evaluate[2] == [(".cpu()", "train.py:evaluate")] * 2, evaluate
    grouping = runs["grouping"]
    inside = [r for r in grouping if r[1].startswith("gbg.py")]
    assert inside == [(".cpu()", "gbg.py:_dataset_labels"), (".tolist()", "gbg.py:class_gradients"),
                      (".cpu()", "gbg.py:class_gradients")], grouping
    assert len(grouping) <= 12, grouping


# What torch.use_deterministic_algorithms lists as raising on CUDA (no deterministic kernel), by
# aten name; and the atomics it swaps for deterministic kernels under --deterministic.
NO_DETERMINISTIC_CUDA_KERNEL = {
    "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward",
    "avg_pool3d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward", "max_unpool2d",
    "max_unpool3d", "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward", "reflection_pad1d_backward", "reflection_pad2d_backward",
    "reflection_pad3d_backward", "nll_loss2d_forward", "_ctc_loss_backward", "_embedding_bag_backward", "put_",
    "histc", "median", "grid_sampler_2d_backward", "grid_sampler_3d_backward"}
DETERMINISTIC_UNDER_THE_FLAG = {"index_add", "index_put", "index_put_", "_index_put_impl_", "scatter_add",
                                "scatter_add_", "cumsum", "gather", "index_select", "index_copy"}


def test_every_op_has_a_deterministic_cuda_kernel(runs):
    """--deterministic cannot end a run: none of the ops the steps, the evaluation, the grouping
    (sketched) and the views dispatch is one torch has no deterministic CUDA kernel for. The pooling
    is adaptive_avg_pool2d(x, 1), which torch computes as a mean (no pooling backward kernel); the
    atomics (index_add of the group losses and the sketch) take deterministic kernels under the flag."""
    assert not runs["ops"] & NO_DETERMINISTIC_CUDA_KERNEL, runs["ops"] & NO_DETERMINISTIC_CUDA_KERNEL
    assert {"index_add", "mean"} <= runs["ops"] and "_adaptive_avg_pool2d" not in runs["ops"]
