"""The fused BN-ReLU-pool kernel against PyTorch's own layers: values, gradients, running stats.

Both implementations are checked: the C kernel of `fersearch.native` and the PyTorch composition.
"""

import copy
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fersearch import native
from fersearch.config import resolve_config
from fersearch.engine import Loss, build_optimizer
from fersearch.kernels import bn_relu_pool, bn_relu_pool_applies, conv
from fersearch.models import build_model


def reference(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.max_pool2d(F.relu(bn(x)), 2)




@pytest.fixture(scope="module")
def generic_library(tmp_path_factory):
    """The kernels built with the required flags only: no -march=native (so no AVX and the
    narrower register blocks) and no OpenMP, as on a machine where those flags fail."""
    try:
        cc = native._compiler()
    except OSError:
        pytest.skip("no C compiler on this machine")
    out = tmp_path_factory.mktemp("generic") / "fused-generic.so"
    native.compile_library(out, cc, flag_sets=[[]])
    return native._load(out)


@pytest.fixture(params=["tuned", "generic"])
def kernel_build(request, monkeypatch):
    """Runs a test with this machine's build of the C kernels, then with the generic build."""
    if request.param == "generic":
        monkeypatch.setitem(native._state, "lib", request.getfixturevalue("generic_library"))
    if native.library() is None:
        pytest.skip("C kernels unavailable here")
    return request.param


@pytest.fixture(params=["native", "generic", "torch"])
def use_native(request, monkeypatch) -> bool:
    """The C kernel as built for this machine, the generic build of it, or the PyTorch composition."""
    if request.param == "generic":
        monkeypatch.setitem(native._state, "lib", request.getfixturevalue("generic_library"))
    if request.param != "torch" and native.library() is None:
        pytest.skip("C kernels unavailable here (test_native_kernels_build covers machines with a compiler)")
    return request.param != "torch"


def test_native_kernels_build():
    """Where a C compiler exists the kernels must build, or every native test above would skip."""
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler on this machine")
    assert native.library() is not None


def test_without_a_compiler_the_pytorch_path_is_used(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("FERSEARCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
    assert "C kernels unavailable" in caplog.text
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    bn = nn.BatchNorm2d(3)
    torch.testing.assert_close(bn_relu_pool(x, bn), reference(x.detach(), nn.BatchNorm2d(3)))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("FERSEARCH_NATIVE", "0")
    monkeypatch.delenv("CC")
    assert native.library() is None


def test_a_cached_build_loads_without_a_compiler(monkeypatch, tmp_path):
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("FERSEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    built = native._build()
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails: only the cache can serve
    assert native.library() is not None
    assert list((tmp_path / "native").iterdir()) == [built]


def test_a_damaged_cached_build_is_rebuilt(monkeypatch, tmp_path):
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("FERSEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    built = native._build()  # compiled, not loaded: a loaded library must never be overwritten
    built.write_bytes(b"not a shared object")
    assert native.library() is not None
    assert built.stat().st_size > 1000


@pytest.mark.parametrize("shape", [(8, 6, 44, 44), (5, 16, 18, 18), (3, 4, 2, 6), (2, 9, 4, 4)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_matches_pytorch_layers(shape, layout, use_native):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3 + 1).contiguous(memory_format=layout)
    bn = nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        # Negative scales too: the kernel must pool the minimum of those channels.
        bn.weight.copy_(torch.randn(shape[1], generator=gen))
        bn.bias.copy_(torch.randn(shape[1], generator=gen))
    bn_fused = copy.deepcopy(bn)
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=gen)

    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    out_ref, out = reference(xa, bn), bn_relu_pool(xb, bn_fused, use_native)
    assert out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(out_ref, [xa, bn.weight, bn.bias], grad)
    grads = torch.autograd.grad(out, [xb, bn_fused.weight, bn_fused.bias], grad)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn_fused.running_mean, bn.running_mean)
    torch.testing.assert_close(bn_fused.running_var, bn.running_var)
    assert int(bn_fused.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_ties_go_to_one_input(use_native):
    """A window of equal values passes its gradient to exactly one input, as max-pool does."""
    x = torch.ones(2, 3, 4, 4)
    x[:, :, :2, :2] = 2.0  # four-way tie in the first window
    bn = nn.BatchNorm2d(3)
    x.requires_grad_()
    out = bn_relu_pool(x, bn, use_native)
    (g,) = torch.autograd.grad(out[:, :, 0, 0].sum(), [x])
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(reference(xr, nn.BatchNorm2d(3))[:, :, 0, 0].sum(), [xr])
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-6)


def test_native_ties_follow_max_pool_exactly(kernel_build):
    """Every pattern of tied maxima in a window: the gradient goes where PyTorch's max-pool sends it."""
    patterns = torch.tensor([[(m >> k) & 1 for k in range(4)] for m in range(1, 16)], dtype=torch.float32)
    x = torch.zeros(len(patterns), 1, 2, 4)
    x[:, 0, :, :2] = patterns.view(-1, 2, 2)  # tied ones in the left window, zeros elsewhere
    x[:, 0, :, 2:] = -1.0
    for sign in (1.0, -1.0):  # a negative scale pools the minimum of x
        bn = nn.BatchNorm2d(1)
        with torch.no_grad():
            bn.weight.fill_(sign)
        xs = (x * sign).requires_grad_()
        xr = xs.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(bn_relu_pool(xs, copy.deepcopy(bn))[..., 0].sum(), [xs])
        (gr,) = torch.autograd.grad(reference(xr, bn)[..., 0].sum(), [xr])
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-6)


def test_nan_reaches_the_output(use_native):
    """A diverged map must not be hidden by the ReLU, or training could not notice it."""
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 0, 0] = float("nan")
    assert torch.isnan(bn_relu_pool(x.requires_grad_(), nn.BatchNorm2d(3), use_native)).any()


@pytest.mark.parametrize(
    "batch,size,out_ch,k,pad", [(8, 48, 6, 5, 0), (3, 48, 5, 3, 1), (2, 20, 7, 5, 2), (4, 9, 3, 1, 0), (2, 71, 2, 8, 0)]
)
def test_one_channel_conv_matches_pytorch(batch, size, out_ch, k, pad, kernel_build):
    """The C convolution of the first layer: outputs, filter and bias gradients (input: data)."""
    gen = torch.Generator().manual_seed(size + k)
    layer = nn.Conv2d(1, out_ch, k, padding=pad)
    x = torch.randn(batch, 1, size, size, generator=gen)
    out, ref = conv(x, layer), layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(ref.shape, generator=gen)
    got = torch.autograd.grad(out, [layer.weight, layer.bias], grad)
    want = torch.autograd.grad(ref, [layer.weight, layer.bias], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "in_ch,out_ch,k,size,pad",
    # Input widths 22, 13, 21, 9, 6, 7 and 8: every remainder of the kernel's 2- and 4-pixel blocks.
    [(6, 16, 5, 22, 0), (4, 8, 3, 11, 1), (5, 16, 5, 21, 0), (1, 8, 3, 9, 0), (2, 16, 1, 6, 0), (3, 8, 3, 7, 0),
     (6, 16, 3, 8, 0)],
)  # fmt: skip
def test_narrow_conv_input_gradient_matches_pytorch(in_ch, out_ch, k, size, pad, kernel_build):
    """Up to 6 input channels into 8 or 16 filters: the input gradient comes from the C kernel."""
    gen = torch.Generator().manual_seed(in_ch * 100 + size)
    layer = nn.Conv2d(in_ch, out_ch, k, padding=pad)
    x = torch.randn(5, in_ch, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = conv(xa, layer), layer(xb)
    assert "NativeGradInputConv" in out.grad_fn.name()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=gen)
    got = torch.autograd.grad(out, [xa, layer.weight, layer.bias], grad)
    want = torch.autograd.grad(ref, [xb, layer.weight, layer.bias], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_one_channel_conv_falls_back_where_it_does_not_apply():
    """Rows wider than the kernel's 64 outputs, strides, and inputs that need a gradient use PyTorch."""
    layer = nn.Conv2d(1, 2, 3)
    wide = torch.randn(1, 1, 8, 80)
    torch.testing.assert_close(conv(wide, layer), layer(wide))
    wide_filters = nn.Conv2d(1, 16, 3)  # oneDNN is faster from 12 filters on
    x = torch.randn(2, 1, 12, 12)
    assert torch.equal(conv(x, wide_filters), wide_filters(x))
    strided = nn.Conv2d(1, 2, 3, stride=2)
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(conv(x, strided), strided(x))
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(conv(xg, layer).sum(), [xg])
    (gr,) = torch.autograd.grad(layer(xr := x.clone().requires_grad_()).sum(), [xr])
    torch.testing.assert_close(g, gr)


def test_native_kernels_agree_across_thread_counts():
    """Splitting rows over threads changes only the order of float sums."""
    if native.library() is None:
        pytest.skip("C kernels unavailable here")
    torch.manual_seed(5)  # the layers' initial weights
    x = torch.randn(16, 1, 48, 48)
    layer, bn, layer2 = nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.Conv2d(6, 16, 5)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            # Through all three kernels: the first layer's filter gradient passes the second
            # layer's input gradient and the BN-ReLU-pool backward.
            out = conv(bn_relu_pool(conv(x, layer), copy.deepcopy(bn)), layer2)
            # Not the conv bias: batch norm cancels it, so its gradient is rounding noise around 0.
            (grad_w,) = torch.autograd.grad(out.square().sum(), [layer.weight])
            results.append((out, grad_w))
    finally:
        torch.set_num_threads(before)
    for one, many in zip(*results, strict=True):
        # Filter gradients here reach ~3e3 and sum ~30k products: summation order moves an
        # entry near 0 by ~1e-3, so the absolute tolerance follows the tensor's scale.
        torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-6 * float(one.detach().abs().max()) + 1e-5)


def test_not_used_where_it_does_not_apply():
    bn = nn.BatchNorm2d(4)
    assert not bn_relu_pool_applies(torch.zeros(2, 4, 5, 6), bn)  # odd side: max-pool drops a row
    assert not bn_relu_pool_applies(torch.zeros(2, 4, 6, 6, dtype=torch.float64), bn)
    bn.eval()
    assert not bn_relu_pool_applies(torch.zeros(2, 4, 6, 6), bn)  # running statistics: plain layers
    bn.train()
    with torch.no_grad():
        assert not bn_relu_pool_applies(torch.zeros(2, 4, 6, 6), bn)
    assert bn_relu_pool_applies(torch.zeros(2, 4, 6, 6), bn)
    # Wide maps: PyTorch's layers measured as fast.
    assert not bn_relu_pool_applies(torch.zeros(2, 128, 6, 6), nn.BatchNorm2d(128))


@pytest.mark.parametrize(
    "overrides", [{}, {"activation": "gelu"}, {"batch_norm": False}, {"padding": "same", "channels": [4, 8]}]
)
def test_cnn_trains_the_same_with_kernels_or_not(overrides):
    cfg = resolve_config("cnn", {"dropout": 0.0, **overrides})
    torch.manual_seed(0)
    fused = build_model(cfg, 8)
    plain = copy.deepcopy(fused)
    plain.use_kernels = False
    assert fused.use_kernels
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 48, 48, generator=gen)
    y = torch.softmax(torch.randn(16, 8, generator=gen), 1)
    loss_fn = Loss("probability")
    for model in (fused, plain):
        opt = build_optimizer(cfg, model)
        for _ in range(5):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), (_, b) in zip(fused.state_dict().items(), plain.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), plain(x))


def test_blocks_that_cannot_fuse_run_their_own_layers():
    """With kernels on, a GELU or BN-free net must not skip or change any layer."""
    for overrides in ({"activation": "gelu"}, {"batch_norm": False}):
        torch.manual_seed(0)
        model = build_model(resolve_config("cnn", overrides), 8).train()
        assert model.use_kernels
        x = torch.randn(4, 1, 48, 48)
        torch.manual_seed(1)
        with_kernels = model(x)
        model.use_kernels = False
        torch.manual_seed(1)
        torch.testing.assert_close(with_kernels, model(x), rtol=1e-5, atol=1e-5)


def test_a_shape_a_kernel_does_not_take_is_an_exception(kernel_build):
    """Each kernel checks its shape before touching memory (the pointers here are all NULL)."""
    lib = native.library()
    cases = [
        ("bnrp_forward", [0, 1, 3, 4, 2, 0, 0, 1e-5, 0, 0, 0, 0, 0, 0, 1]),  # odd H
        ("bnrp_forward", [0, -1, 4, 4, 2, 0, 0, 1e-5, 0, 0, 0, 0, 0, 0, 1]),  # negative N
        ("bnrp_backward", [0, 0, 0, 0, 0, 1, 4, 4, 1 << 40, 0, 0, 0, 0, 0, 0, 1]),  # 2^44 values
        ("conv1_forward", [0, 0, 0, 1, 80, 80, 6, 5, 0, 1]),  # rows of 76 outputs: more than 64
        ("conv1_backward", [0, 0, 1, 4, 4, 6, 5, 0, 0, 1]),  # a 5x5 filter on a 4x4 image
        ("conv_grad_input", [0, 0, 1, 8, 8, 6, 12, 5, 0, 1]),  # 12 filters: only 8 or 16 taken
    ]
    for name, args in cases:
        with pytest.raises(ValueError, match=f"C kernel {name} does not take this shape"):
            native.call(lib, name, *args)
    # Through autograd too: an odd side reaches the kernel only by calling it directly.
    with pytest.raises(ValueError, match="bnrp_forward"):
        bn_relu_pool(torch.randn(2, 3, 5, 6), nn.BatchNorm2d(3))


def test_a_failed_allocation_is_a_memory_error(tmp_path):
    """Under an address-space cap, a kernel whose scratch buffer cannot be had raises
    MemoryError in Python instead of writing through a NULL pointer."""
    if native.library() is None:
        pytest.skip("C kernels unavailable here")
    script = tmp_path / "oom.py"
    script.write_text(
        "import resource, torch\n"
        "from fersearch import native\n"
        "lib = native.library()\n"
        "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
        "try:\n"
        "    native.call(lib, 'bnrp_forward', 0, 1, 2, 2, 1 << 31, 0, 0, 1e-5, 0, 0, 0, 0, 0, 0, 1)\n"
        "except MemoryError as exc:\n"
        "    print('raised', exc)\n"
    )
    if not Path("/proc/self/statm").exists():
        pytest.skip("no /proc here to size the cap")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "raised C kernel bnrp_forward out of memory" in result.stdout


def test_a_second_openmp_runtime_means_the_pytorch_path(monkeypatch, tmp_path, caplog):
    if native.library() is None:
        pytest.skip("C kernels unavailable here")
    if native.openmp_runtimes() is not None:  # Linux: the runtime torch loaded is listed
        assert any("omp" in Path(p).name for p in native.openmp_runtimes())
    assert native.foreign_openmp({"/t/libgomp.so.1"}, {"/t/libgomp.so.1"}) == set()
    assert native.foreign_openmp(None, {"/x/libomp.so"}) == set()  # unknown: trusted
    assert native.foreign_openmp({"/t/libgomp.so.1"}, {"/t/libgomp.so.1", "/x/libiomp5.so"}) == {"/x/libiomp5.so"}
    assert native.OPENMP_RUNTIME.search("/usr/lib/x86_64-linux-gnu/libgomp.so.1")
    assert not native.OPENMP_RUNTIME.search("/usr/lib/libgompish-tools/libc.so.6")
    # A load that brings in a runtime other than torch's: one warning, the PyTorch path.
    seen = iter([{"/t/libgomp.so.1"}, {"/t/libgomp.so.1", "/usr/lib/libomp.so.5"}])
    monkeypatch.setattr(native, "openmp_runtimes", lambda: next(seen))
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
        assert native.library() is None
    assert caplog.text.count("resolved OpenMP to /usr/lib/libomp.so.5") == 1
