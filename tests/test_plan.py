"""kernels._plan: plans cached per key, the SM count queried once per device, and the
planning policy as an argument, a context (kernels.planning) or the process default.

Host code only (no kernel runs): plans are made for CPU tensors, and for a CUDA device
whose properties are faked, since the tests also run without a GPU."""

import contextvars
import dataclasses
import types

import pytest
import torch

import kernels
from kernels import _plan
from kernels._plan import FAST_INTERPRETER_PLANS, GPU_PLANS, plan

SINGLE = (4, 8, 3, 3)  # a channel's plane fits one tile: the single-launch path
GENERAL = (7, 3, 31, 23)  # several tiles per channel
WIDE = (64, 64, 28, 28)  # enough channels and tiles for the SM count to change the split


@pytest.fixture
def fresh_cache():
    """An empty plan cache, so that its hit and miss counts are this test's."""
    _plan._cached_plan.cache_clear()
    yield _plan._cached_plan
    _plan._cached_plan.cache_clear()


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.get_device_properties answering for any device index (132 SMs as an H100,
    cuda:1 a smaller GPU's 78), counting the queries; the SM and plan caches are emptied
    around it."""
    queries = []

    def properties(device):
        queries.append(device)
        return types.SimpleNamespace(multi_processor_count=78 if device.index == 1 else 132)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    _plan._cuda_sms.cache_clear()
    _plan._cached_plan.cache_clear()
    yield queries
    _plan._cuda_sms.cache_clear()  # a real GPU's count and plans, not the fake's, after it
    _plan._cached_plan.cache_clear()


def stand_in(shape, device, dtype=torch.float32):
    """What plan() reads of a tensor, on any device (no CUDA is needed for a cuda one)."""
    stride = torch.empty(shape, device="meta").stride()
    return types.SimpleNamespace(shape=torch.Size(shape), stride=lambda: stride, dtype=dtype,
                                 device=torch.device(device))


def test_plan_is_cached_per_key(fresh_cache):
    x = torch.empty(GENERAL)
    first = plan(x, False)
    assert plan(torch.empty(GENERAL), False) is first  # another tensor, the same key
    assert fresh_cache.cache_info()[:2] == (1, 1)  # (hits, misses)
    sliced = torch.empty(GENERAL[0], 2 * GENERAL[1], *GENERAL[2:])[:, :GENERAL[1]]
    others = [  # each a key of its own: computed anew
        lambda: plan(sliced, False),  # other strides (the same plan)
        lambda: plan(x.double(), False),
        lambda: plan(x, False, policy=dataclasses.replace(GPU_PLANS, tile_elems=2048)),
        lambda: plan(x, True),
        lambda: plan(x, False, merge=False),
        lambda: plan(x, False, single_launch=False),
    ]
    for i, other in enumerate(others):
        other()
        assert fresh_cache.cache_info().misses == 2 + i, i
    assert plan(sliced, False) == first
    assert plan(x, False, policy=dataclasses.replace(GPU_PLANS)) is first  # an equal policy
    assert fresh_cache.cache_info().misses == 1 + len(others)


class _Size(int):
    """An int that is not a plain int, as a symbolic size is not."""


def test_sizes_that_are_not_plain_ints_are_planned_uncached(fresh_cache):
    x = stand_in(GENERAL, "cpu")
    x.shape = tuple(_Size(s) for s in GENERAL)
    assert plan(x, False) == plan(torch.empty(GENERAL), False)
    assert fresh_cache.cache_info().currsize == 1  # only the plain tensor's plan


def test_meta_tensors_get_the_cpu_plans():
    """bnbench traffic plans full-size shapes on meta tensors: the interpreter's H100 plans."""
    for shape in (GENERAL, SINGLE):
        assert plan(torch.empty(shape, device="meta"), False) == plan(torch.empty(shape), False)


def test_num_sms_is_queried_once_per_device(fake_cuda):
    assert [_plan.num_sms(torch.device("cuda", 0)) for _ in range(3)] == [132] * 3
    assert _plan.num_sms(torch.device("cuda", 1)) == 78
    plan(stand_in(GENERAL, "cuda:0"), False)
    plan(stand_in(SINGLE, "cuda:1"), False)
    assert fake_cuda == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert _plan.num_sms(torch.device("cpu")) == 132
    assert _plan.num_sms(torch.device("cpu"), FAST_INTERPRETER_PLANS) == 1


def test_cuda_plans_for_the_device_not_the_policy(fake_cuda):
    """The fast interpreter plans never apply to CUDA tensors; the device's SMs are used."""
    for shape in (GENERAL, SINGLE):
        for channels_last in (False, True):
            x = stand_in(shape, "cuda:0")
            gpu = plan(x, channels_last, policy=GPU_PLANS)
            assert plan(x, channels_last, policy=FAST_INTERPRETER_PLANS) == gpu
            with kernels.planning(FAST_INTERPRETER_PLANS):
                assert plan(x, channels_last) == gpu
            cpu = stand_in(shape, "cpu")
            assert plan(cpu, channels_last, policy=GPU_PLANS) == gpu  # 132 SMs either way
    cpu, small_gpu = stand_in(WIDE, "cpu"), stand_in(WIDE, "cuda:1")
    assert plan(cpu, False, policy=FAST_INTERPRETER_PLANS).programs < plan(cpu, False).programs
    assert plan(small_gpu, False).programs < plan(cpu, False).programs  # 78 SMs, not 132


def test_planning_switches_the_path_and_restores_it():
    x = torch.empty(SINGLE)
    assert _plan.current_policy() == GPU_PLANS
    assert plan(x, False).single_launch
    with kernels.planning(single_launch_max_elems=0) as policy:
        assert policy == dataclasses.replace(GPU_PLANS, single_launch_max_elems=0)
        assert not plan(x, False).single_launch
        assert plan(x, False, policy=GPU_PLANS).single_launch  # an argument wins
        with kernels.planning(FAST_INTERPRETER_PLANS, fast_tile_elems=1024) as inner:
            assert inner.fast_interpreter and inner.single_launch_max_elems == 4096
            assert _plan.current_policy() is inner
        with kernels.planning(sms=1) as inner:  # overrides apply to the current policy
            assert (inner.single_launch_max_elems, inner.sms) == (0, 1)
        assert _plan.current_policy() is policy
    assert _plan.current_policy() == GPU_PLANS
    assert plan(x, False).single_launch


def test_planning_restores_on_exception():
    with pytest.raises(ValueError, match="inside"):
        with kernels.planning(single_launch_max_elems=0):
            raise ValueError("inside")
    assert _plan.current_policy() == GPU_PLANS
    assert plan(torch.empty(SINGLE), False).single_launch


def test_planning_rejects_unknown_fields():
    with pytest.raises(TypeError):
        with kernels.planning(single_launch=False):
            pass


def _backward_kernels(y, fresh_context):
    """The kernels the backward of `y` launches, run in an empty context (as on the thread
    autograd runs a CUDA backward on, where the caller's context variables are not set)."""
    from kernels._triton_internals import record_launches

    def backward():
        with record_launches(execute=True) as launched:
            y.sum().backward()
        return {launch.fn.__name__ for launch in launched}
    return contextvars.Context().run(backward) if fresh_context else backward()


@pytest.mark.parametrize("fresh_context", [False, True], ids=["same-thread", "empty-context"])
def test_a_backward_plans_with_its_forward_s_policy(fresh_context):
    """kernels.batch_norm's backward is planned with the policy its forward saw, also where
    the caller's context is not set."""
    x = torch.randn(SINGLE, requires_grad=True)
    with kernels.planning(single_launch_max_elems=0):
        y = kernels.batch_norm(x, None, None, training=True)
    assert "_bn_bwd_single_launch_kernel" not in _backward_kernels(y, fresh_context)
    y = kernels.batch_norm(x, None, None, training=True)  # the default: single launch here
    assert "_bn_bwd_single_launch_kernel" in _backward_kernels(y, fresh_context)


def test_set_interpreter_plans_sets_the_default_and_returns_the_previous():
    x = torch.empty(GENERAL)
    gpu = plan(x, False)
    try:
        assert kernels.set_interpreter_plans(True) is False
        assert _plan.current_policy() == FAST_INTERPRETER_PLANS
        assert plan(x, False).programs < gpu.programs
        assert kernels.set_interpreter_plans(True) is True
        with kernels.planning(GPU_PLANS):  # a context takes precedence
            assert plan(x, False) == gpu
    finally:
        assert kernels.set_interpreter_plans(False) is True
    assert kernels.set_interpreter_plans(False) is False
    assert plan(x, False) == gpu
