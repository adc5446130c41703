"""The CUDA paths checked on the CPU: the synchronised BatchNorm converts the same modules on both
and computes the batch norm of the whole batch (GlobalBatchNorm, the CPU reference of
nn.SyncBatchNorm, against nn.BatchNorm over the concatenated batch, two gloo processes), MGDA's
gradients keep the parameters' memory layout, the flags and torch versions that cannot work are
refused in one line, and --deterministic sets what CUDA needs to repeat a run."""
import argparse
import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import data_lt
import gbg
import train as T

K = 6
COUNTS = [30, 16, 9, 6, 4, 3]


# --- SyncBatchNorm: the same modules, the same numbers ---------------------------------------------

def test_sync_bn_converts_the_same_modules_on_cpu_and_cuda():
    """--sync-bn on the CPU converts what nn.SyncBatchNorm.convert_sync_batchnorm converts on CUDA:
    every BatchNorm, the BCL heads' BatchNorm1d included, with the same state."""
    model = T.make_bcl_model(T.build_model("resnet8", K), COUNTS)
    cpu = T.convert_sync_bn(copy.deepcopy(model), torch.device("cpu"))
    cuda = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))  # conversion alone needs no GPU
    on_cpu = {n for n, m in cpu.named_modules() if isinstance(m, T.GlobalBatchNorm)}
    on_cuda = {n for n, m in cuda.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    assert on_cpu == on_cuda and {"head.1", "head_fc.1", "backbone.bn"} <= on_cpu
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, T.GlobalBatchNorm)
                   for m in cpu.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(cpu.state_dict()[k], v) and torch.equal(cuda.state_dict()[k], v), k


SHAPES = {"1d": (12, 5), "1d_seq": (12, 5, 4), "2d": (12, 5, 3, 3)}


def batch(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def bn_rank(rank, folder):
    """One of two gloo processes: GlobalBatchNorm on its half of each batch (train mode), a
    weighted sum of its outputs backwards; saves what it got."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        out = {}
        for name, shape in SHAPES.items():
            mine = slice(rank * shape[0] // 2, (rank + 1) * shape[0] // 2)
            x = batch(shape, 1)[mine].requires_grad_()
            bn = T.GlobalBatchNorm(shape[1]).double()
            with torch.no_grad():
                bn.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
                bn.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
            y = bn(x)
            (y * batch(shape, 2)[mine]).sum().backward()
            out[name] = dict(y=y.detach(), x_grad=x.grad, weight_grad=bn.weight.grad, bias_grad=bn.bias.grad,
                             running_mean=bn.running_mean, running_var=bn.running_var)
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_over_two_processes_is_batchnorm_of_the_whole_batch(tmp_path):
    """The CPU reference of nn.SyncBatchNorm: two processes holding half a batch each get the
    outputs, input gradients and running statistics of torch's BatchNorm over the whole batch, and
    their weight and bias gradients add up to its (each process differentiates its own loss)."""
    mp.spawn(bn_rank, args=(str(tmp_path),), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, shape in SHAPES.items():
        ref = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(shape[1]).double().train()
        with torch.no_grad():
            ref.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
            ref.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
        x = batch(shape, 1).requires_grad_()
        y = ref(x)
        (y * batch(shape, 2)).sum().backward()
        got = lambda k: torch.cat([r[name][k] for r in ranks])
        close = lambda a, b: torch.allclose(a, b, rtol=1e-12, atol=1e-12)
        assert close(got("y"), y.detach()) and close(got("x_grad"), x.grad), name
        assert close(ranks[0][name]["weight_grad"] + ranks[1][name]["weight_grad"], ref.weight.grad), name
        assert close(ranks[0][name]["bias_grad"] + ranks[1][name]["bias_grad"], ref.bias.grad), name
        for r in ranks:
            assert close(r[name]["running_mean"], ref.running_mean), name
            assert close(r[name]["running_var"], ref.running_var), name


# --- MGDA's gradients in the parameters' layout ----------------------------------------------------

def test_mgda_grads_take_the_parameters_layout():
    """Under --amp the model is channels_last. The exact step's p.grad (made by gbg._accumulate)
    has each parameter's strides, as autograd's .backward() gives them: a contiguous grad of a
    channels_last weight sends the optimiser's foreach kernels down their slow path."""
    torch.manual_seed(0)
    model = T.build_model("resnet8", K).to(memory_format=torch.channels_last)
    x = torch.randn(12, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.arange(12) % K
    losses, present = gbg.group_losses(model(x), y, torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    params = list(model.parameters())
    gbg.mgda_backward(list(losses[present]), params, retain_graph=True)
    mgda = [p.grad for p in params]
    model.zero_grad(set_to_none=True)
    losses.sum().backward()
    conv = [p for p in params if p.dim() == 4]
    assert conv and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in conv)
    for p, g in zip(params, mgda):
        assert g.stride() == p.stride() == p.grad.stride(), (p.shape, g.stride(), p.stride())


# --- flags and torch versions that cannot work: one line ------------------------------------------

def parse(*argv):
    args = argparse.ArgumentParser(parents=[T.get_args_parser()]).parse_args(list(argv))
    args.rank, args.world_size, args.local_rank, args.distributed = 0, 1, 0, False
    return args


def test_compile_needs_the_apis_it_uses(monkeypatch):
    """--compile uses torch.compiler.set_stance (torch >= 2.6) and
    torch._functorch.config.donated_buffer: present here; without either, one line naming the
    flag and the fix instead of a crash at the first grouping."""
    assert T.compile_supported()
    T.fill_defaults(parse("--compile"))  # accepted here
    for owner, name in ((torch.compiler, "set_stance"), (torch._functorch.config, "donated_buffer")):
        with monkeypatch.context() as m:
            m.delattr(owner, name)
            assert not T.compile_supported()
            with pytest.raises(data_lt.UserError, match="--compile needs torch >= 2.6"):
                T.fill_defaults(parse("--compile"))
            T.fill_defaults(parse())  # without --compile, nothing needs them


def test_last_stage_gram_with_compile_is_refused():
    with pytest.raises(data_lt.UserError, match="--moo-grad last with --compile"):
        T.fill_defaults(parse("--compile", "--moo-grad", "last"))


def test_a_fixed_gpu_under_torchrun_is_refused(monkeypatch):
    """--device cuda:0 under torchrun would put every process on GPU 0: refused, before anything
    touches CUDA; --device cuda with no GPU visible: one line too."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("must refuse first"))
    with pytest.raises(data_lt.UserError, match="--device cuda:0 under torchrun.*LOCAL_RANK"):
        T.init_distributed(parse("--device", "cuda:0"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(data_lt.UserError, match="sees no GPU"):
        T.init_distributed(parse("--device", "cuda"))


def test_process_group_waits_for_rank_zeros_grouping(monkeypatch):
    """The process group's timeout outlasts rank 0's grouping: 384 s for --num-groups auto alone
    at iNaturalist scale (bench (h)), against NCCL's default of 10 minutes."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **k: seen.update(backend=backend, **k))
    monkeypatch.setattr(T.atexit, "register", lambda f: None)
    T.init_distributed(parse("--device", "cpu"))
    assert seen["backend"] == "gloo" and seen["timeout"] >= datetime.timedelta(minutes=30)


# --- --deterministic ------------------------------------------------------------------------------

@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0])
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[1:]


def test_deterministic_sets_what_cuda_needs(restore_determinism):
    # every setting it must turn off (or on), first turned the other way: else a setting left alone passes
    torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.deterministic = False
    T.make_deterministic(parse())  # without the flag: nothing changes
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.deterministic
    T.make_deterministic(parse("--deterministic"))
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
