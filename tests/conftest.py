import faulthandler
import signal
import zlib

import pytest
import torch

import peftkern  # noqa: F401  (registers torch.ops.peftkern)

CUDA = torch.cuda.is_available()

# ||out - ref|| / ||ref|| allowed per storage dtype (the README's tests section); the reference is float64.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def pytest_addoption(parser):
    parser.addoption(
        "--case-timeout",
        type=float,
        default=0,
        help="seconds per test (0 = none): past it the test fails with a TimeoutError; a test stuck "
        "in native code (a hung kernel) has its process killed 30 s later, with every thread's stack "
        "dumped (under pytest-xdist the worker is replaced and the test reported as crashed)",
    )


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not CUDA:
        pytest.skip("needs a CUDA GPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """--case-timeout: SIGALRM raises in the test; faulthandler kills a process that never returns to
    Python. (pytest-timeout does the same; the GPU machine does not have it.)"""
    limit = item.config.getoption("--case-timeout")
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid}: over --case-timeout={limit:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + 30, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite values (unwritten or overflowed output)"
    denom = ref.norm()
    return ((out - ref).norm() / denom).item() if denom > 0 else out.norm().item()


def assert_close(out, ref, dtype, what="output", tol=None):
    tol = REL_TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype})"


def check_against_reference(fn, ref_fn, inputs, names, dtype, tol=None):
    """fn(*inputs) and every gradient it gives the inputs that require one, against ref_fn run in
    float64 on the same values. Returns the output.

    The upstream gradient has the op's dtype (the reference gets the same values) and a nonzero
    mean, as real losses give: gradient sums over rows then grow with the row count instead of
    cancelling to a small random value, so the relative tolerance measures the kernel rather than
    the conditioning of a random-sign sum (a 1-element bias gradient at r=1, say)."""
    from .reference import f64

    out = fn(*inputs)
    assert out.dtype == dtype and out.device == inputs[0].device
    leaves = [f64(t) for t in inputs]
    expected = ref_fn(*leaves)
    assert_close(out, expected, dtype, "out", tol)
    grad = torch.randn_like(out) + 0.5
    out.backward(grad)
    expected.backward(grad.double())
    for name, t, t64 in zip(names, inputs, leaves):
        if t is not None and t.requires_grad:
            assert t.grad is not None, f"no gradient for {name}"
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            expected_grad = torch.zeros_like(t64) if t64.grad is None else t64.grad  # unused by the reference
            # a gradient stored in a coarser dtype than the op's (float32 scores of a float64 op) is
            # held to that dtype's bound
            coarser = max(dtype, t.dtype, key=lambda d: REL_TOL[d])
            assert_close(t.grad, expected_grad, coarser, f"grad {name}", tol)
    return out


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def poison_cuda_cache():
    """Fill the caching allocator's free blocks with 0xFF bytes (NaN in every float dtype), so an
    output element a kernel forgets to write reads as NaN and fails the finiteness check."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.empty(1 << 20, dtype=torch.uint8, device="cuda").fill_(255) for _ in range(64)]
    blocks.append(torch.empty(512 << 20, dtype=torch.uint8, device="cuda").fill_(255))
    del blocks
    torch.cuda.synchronize()


def count_cuda_syncs(fn):
    """How many synchronizing CUDA calls (device-to-host copies, .item(), ...) fn() makes."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible stream of random inputs per test.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
