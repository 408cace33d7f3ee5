"""The lean eager route (kernels._eager) against the full route (custom ops, setup_context
autograd rule): the same results bit for bit, the same errors, one autograd node, and the
full route wherever torch.func, forward AD, tracing or torch.compile is active."""

import pytest
import torch

import kernels
from kernels import _eager

# (training, epilogue as (residual, activation), layout, momentum, track_running_stats)
CASES = [
    (True, (False, None), "nchw", 0.1, True),
    (True, (True, "relu"), "channels_last", 0.1, True),  # an NCHW residual: copied
    (True, (True, "silu"), "channels_last_all", 0.1, True),  # read in place: a recipe
    (True, (False, "silu"), "nchw", None, True),  # cumulative average
    (True, (True, None), "nchw", 0.1, False),  # batch statistics only
    (False, (False, None), "channels_last", 0.1, True),
    (False, (True, "silu"), "nchw", 0.1, True),
    (False, (False, "relu"), "nchw", 0.1, True),
]


def _step(route_full, case, x, r, dy, state):
    """One forward + backward of a fresh module loaded with `state`; what it produced."""
    training, (has_res, act), layout, momentum, track = case
    m = kernels.BatchNorm2d(x.shape[1], momentum=momentum, track_running_stats=track,
                            activation=act)
    m.load_state_dict(state)
    m.train(training)
    x = x.clone().requires_grad_()
    r = r.clone().requires_grad_() if has_res else None
    with (_eager.full_route() if route_full else _eager_counting()) as used:
        y = m(x, r)
        y.backward(dy)
    grads = [x.grad, m.weight.grad, m.bias.grad] + ([r.grad] if has_res else [])
    return used, [y, *grads, *m.state_dict().values()]


class _eager_counting:
    """Counts the calls that took the lean route."""

    def __enter__(self):
        self.calls, self.original = [], _eager.call
        original = self.original

        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls.append(out is not None)
            return out
        _eager.call = counted  # kernels.ops and kernels.modules call _eager.call
        return self.calls

    def __exit__(self, *exc):
        _eager.call = self.original


@pytest.mark.parametrize("path", ["single_launch", "general"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_lean_route_matches_the_full_route_bit_for_bit(case, path):
    """Both launch paths: the lean route's recipes (kernels.forward.eval_recipe,
    train_recipe, kernels.backward.backward_recipe) against the host functions."""
    policy = {} if path == "single_launch" else {"single_launch_max_elems": 0}
    with kernels.planning(**policy):
        _lean_against_full(case)


def _lean_against_full(case):
    torch.manual_seed(1)
    shape = (3, 5, 7, 6)  # odd sizes, masks everywhere
    x = torch.randn(shape) * 3 + 2
    if case[2].startswith("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    r, dy = torch.randn(shape), torch.randn(shape)
    if case[2] == "channels_last_all":
        r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (r, dy))
    ref = kernels.BatchNorm2d(shape[1], momentum=case[3], track_running_stats=case[4])
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
        if case[4]:
            ref.running_mean.uniform_(-1, 1), ref.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    used, lean = _step(False, case, x, r, dy, state)
    _, full = _step(True, case, x, r, dy, state)
    assert used == [True], "the module call did not take the lean route"
    assert len(lean) == len(full)
    for i, (a, b) in enumerate(zip(lean, full)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), i
        assert torch.equal(a, b), f"output {i} differs between the routes"


def test_one_autograd_node_per_call(device):
    m = kernels.BatchNorm2d(4).to(device)
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    y = m(x)
    node = y.grad_fn
    assert type(node).__name__ == "_EagerFunctionBackward"
    leaves = {type(f).__name__ for f, _ in node.next_functions if f is not None}
    assert leaves == {"AccumulateGrad"}  # x, weight and bias straight behind the one node


def test_no_node_without_a_gradient():
    m = kernels.BatchNorm2d(4).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 4, 3, 3))
    assert y.grad_fn is None and not y.requires_grad


def test_the_full_route_under_transforms_and_tracing():
    """torch.func, forward AD and jit.trace take the full route (which supports them)."""
    m = kernels.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    with _eager_counting() as calls:
        torch.func.vmap(m)(x.unsqueeze(0).expand(2, *x.shape))
        torch.func.grad(lambda t: m(t).sum())(x)
        with torch.autograd.forward_ad.dual_level():
            m(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
        torch.jit.trace(m, x, check_trace=False)  # (its check re-runs m untraced)
    assert not any(calls), "a transform or trace took the lean route"
    with _eager_counting() as calls:
        m(x)
    assert calls == [True]


def test_checks_per_signature_still_raise():
    """A signature seen before is not checked again, but any other one is: a wrong weight
    size after good calls raises torch's error, and a refused call counts no batch."""
    m = kernels.BatchNorm2d(4)
    x = torch.randn(2, 4, 3, 3)
    m(x), m(x)
    with pytest.raises(RuntimeError, match="should contain 5 elements"):
        kernels.batch_norm(torch.randn(2, 5, 3, 3), m.running_mean.clone().resize_(5),
                           m.running_var.clone().resize_(5), m.weight, m.bias, True)
    before = (m.num_batches_tracked.clone(), m.running_mean.clone())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))
    assert torch.equal(m.num_batches_tracked, before[0])
    assert torch.equal(m.running_mean, before[1])


def test_eval_backward_sees_a_modified_running_stat():
    """As torch's batch norm in eval (it saves the running stats): modifying them between
    the forward and the backward is an error, not a silently wrong gradient."""
    m = kernels.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = m(x)
    with torch.no_grad():
        m.running_var.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_on_the_lean_route():
    """create_graph=True builds the backward of torch ops: second derivatives as gradgradcheck
    finds them numerically (float64, training)."""
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    with _eager_counting() as calls:
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: kernels.batch_norm(x, None, None, w, b, True), (x, w, b))
    assert calls and all(calls)


def test_a_profile_names_the_lean_calls_as_the_ops(device):
    """torch.profiler sees the lean route's forward and backward under the custom ops' names
    (bnbench run's backend column reads them)."""
    m = kernels.BatchNorm2d(3).to(device)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    with torch.profiler.profile() as prof:
        m(x).sum().backward()
    names = {e.name for e in prof.events()}
    assert {"bnbench::batch_norm_train", "bnbench::batch_norm_backward"} <= names, names
