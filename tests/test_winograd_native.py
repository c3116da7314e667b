"""The compiled Winograd transforms (models/winograd_native.py): the same convolution as the torch
formulation, built once and cached, and a clear fallback wherever they cannot be built."""

import logging
import stat

import pytest
import torch
import torch.nn.functional as F

from dabdetr.models import winograd, winograd_native
from dabdetr.models.winograd import winograd_conv3x3


@pytest.fixture(scope="module")
def kernels():
    """The process's kernels. Skips only without a C compiler: where there is one, a failure to
    build or check them fails the tests, with the reason."""
    loaded = winograd_native.kernels()
    if loaded is None:
        if winograd_native._compiler() is None:
            pytest.skip("no C compiler here: the compiled Winograd kernels cannot be built")
        winograd_native.load()  # raises the error that made kernels() fall back
        pytest.fail("kernels() fell back although load() works")
    return loaded


def _case(n, c, k, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (9 * c) ** 0.5
    scale = torch.rand(k, generator=gen) + 0.5
    shift = torch.randn(k, generator=gen)
    grad = torch.randn(n, k, h, w, generator=gen)
    return x, weight, scale, shift, grad


def _conv_and_grads(x, weight, scale, shift, grad, m):
    x, weight = x.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    out = winograd_conv3x3(x, weight, scale, shift, m)
    return (out, *torch.autograd.grad(out, (x, weight), grad))


def _error(got, expected) -> float:
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(("n", "c", "k", "h", "w"),
                         [(2, 32, 48, 9, 13), (1, 16, 16, 8, 8), (3, 16, 32, 1, 5), (1, 48, 16, 6, 2)],
                         ids=["partial-blocks", "whole-blocks", "one-row", "narrow"])
def test_compiled_path_equals_the_torch_path(kernels, monkeypatch, m, n, c, k, h, w):
    """Output, input gradient and weight gradient through the compiled transforms equal the
    float64 direct convolution, and the torch formulation's, within the documented float32
    error of F(m x m); output and input gradient are channels_last."""
    case = _case(n, c, k, h, w)
    compiled = _conv_and_grads(*case, m)
    monkeypatch.setattr(winograd_native, "usable", lambda x, weight: None)
    plain = _conv_and_grads(*case, m)
    x, weight, scale, shift, grad = (t.double() for t in case)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    out = F.conv2d(x, weight * scale[:, None, None, None], shift, padding=1)
    exact = (out, *torch.autograd.grad(out, (x, weight), grad))
    bound = {2: 2e-6, 4: 2e-5}[m]  # test_winograd_float32_error_is_as_documented's bounds
    for got, torch_path, expected in zip(compiled, plain, exact, strict=True):
        assert got.shape == expected.shape
        assert _error(got, expected) < bound
        assert _error(got, torch_path) < bound  # two roundings of the same F(m x m)
    assert compiled[0].is_contiguous(memory_format=torch.channels_last)
    assert compiled[1].is_contiguous(memory_format=torch.channels_last)
    assert compiled[2].is_contiguous()


@pytest.mark.parametrize("m", [2, 4])
def test_compiled_input_and_kernel_transforms(kernels, m):
    """The two forward transforms alone equal the torch formulation's tensors."""
    x, weight = _case(2, 32, 16, 11, 7)[:2]
    assert _error(kernels.input_transform(x, m), winograd._input_transform(x, m)) < 1e-6
    assert _error(kernels.kernel_transform(weight, m), winograd._kernel_transform(weight, m)) < 1e-6


def test_compiled_path_is_taken_only_where_it_applies(kernels):
    """float32 CPU tensors with channel counts divisible by 16 only, and not within
    `disabled()`."""
    assert winograd_native.usable(torch.empty(1, 32, 8, 8), torch.empty(16, 32, 3, 3)) is kernels
    assert winograd_native.usable(torch.empty(1, 24, 8, 8), torch.empty(16, 24, 3, 3)) is None
    assert winograd_native.usable(torch.empty(1, 32, 8, 8), torch.empty(24, 32, 3, 3)) is None
    assert winograd_native.usable(torch.empty(1, 32, 8, 8, dtype=torch.float64),
                                  torch.empty(16, 32, 3, 3, dtype=torch.float64)) is None
    with winograd_native.disabled():
        assert winograd_native.usable(torch.empty(1, 32, 8, 8), torch.empty(16, 32, 3, 3)) is None
    assert winograd_native.usable(torch.empty(1, 32, 8, 8), torch.empty(16, 32, 3, 3)) is kernels


def test_odd_channels_still_compute_the_convolution(kernels):
    """Channels the kernels do not take run through the torch formulation, as before."""
    x, weight, scale, shift, grad = _case(2, 20, 12, 9, 9)
    out = winograd_conv3x3(x, weight, scale, shift, 4)
    expected = F.conv2d(x, weight * scale[:, None, None, None], shift, padding=1)
    assert _error(out, expected) < 2e-5


def test_build_is_cached_private_and_leaves_nothing_behind(kernels, tmp_path, monkeypatch):
    """The second build finds the library without compiling; the directory is the user's alone
    and holds only the library."""
    directory = tmp_path / "kernels"
    first = winograd_native.build(directory)
    calls = []
    real_run = winograd_native.subprocess.run

    def counting_run(command, **kwargs):
        calls.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(winograd_native.subprocess, "run", counting_run)
    assert winograd_native.build(directory) == first
    assert not any("-o" in command for command in calls)  # only `--version`
    assert [p.name for p in directory.iterdir()] == [first.name]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    loaded = winograd_native.load(directory)
    assert loaded.path == first


def test_a_failing_compiler_is_reported(tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal error: no such thing' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="no such thing"):
        winograd_native.build(tmp_path / "kernels", compiler=str(fake))
    assert not any((tmp_path / "kernels").iterdir())


def test_no_compiler_falls_back_with_one_warning(monkeypatch, caplog):
    """Without a compiler the kernels are None, a warning says why, and the convolution still
    runs (through torch)."""
    monkeypatch.setattr(winograd_native, "_STATE", {})
    monkeypatch.setattr(winograd_native, "_compiler", lambda: None)
    monkeypatch.delenv(winograd_native.ENV_SWITCH, raising=False)
    with caplog.at_level(logging.WARNING, logger=winograd_native.__name__):
        assert winograd_native.kernels() is None
        assert winograd_native.kernels() is None
    warnings = [r for r in caplog.records if "no C compiler" in r.getMessage()]
    assert len(warnings) == 1
    x, weight, scale, shift, _ = _case(1, 32, 16, 8, 8)
    expected = F.conv2d(x, weight * scale[:, None, None, None], shift, padding=1)
    assert _error(winograd_conv3x3(x, weight, scale, shift, 4), expected) < 2e-5


def test_environment_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setattr(winograd_native, "_STATE", {})
    monkeypatch.setenv(winograd_native.ENV_SWITCH, "0")

    def no_build(*args, **kwargs):
        raise AssertionError("built although switched off")

    monkeypatch.setattr(winograd_native, "build", no_build)
    assert winograd_native.kernels() is None


def test_a_wrong_library_is_refused(kernels, monkeypatch, tmp_path):
    """The check after loading (a small convolution, forward and both gradients, against
    torch's direct one) catches a library that computes something else."""
    monkeypatch.setattr(winograd_native.Kernels, "input_adjoint",
                        lambda self, grad_tiles, m, shape: torch.zeros(shape))
    with pytest.raises(RuntimeError, match="input gradient is off"):
        winograd_native.load(tmp_path / "kernels")


def test_the_source_has_one_entry_point_per_transform():
    source = winograd_native.source()
    for m in (2, 4):
        for entry in ("in_tr", "out_tr", "out_adj", "in_adj", "k_tr", "k_adj"):
            assert f"int {entry}{m}(const long *A, void **P, long units, int nt)" in source
    assert "#pragma omp parallel" in source


def test_kernels_share_torch_openmp_runtime(kernels):
    """On Linux the compiled library resolves libgomp to the copy torch already loaded, so the
    kernels run on torch's threads (one OpenMP runtime in the process)."""
    runtimes = winograd_native._openmp_runtimes()
    if not runtimes:
        pytest.skip("no /proc/self/maps here")
    assert len(runtimes) == 1, runtimes
    assert kernels.threaded


def test_a_second_openmp_runtime_makes_the_kernels_single_threaded(kernels, monkeypatch, caplog):
    monkeypatch.setattr(winograd_native, "_openmp_runtimes", lambda: {"/a/libgomp.so.1", "/b/libiomp5.so"})
    with caplog.at_level(logging.WARNING, logger=winograd_native.__name__):
        single = winograd_native.Kernels(kernels.path)
    assert not single.threaded
    assert "two OpenMP runtimes" in caplog.text
    x = _case(2, 32, 16, 9, 9)[0]
    assert torch.equal(single.input_transform(x, 4), kernels.input_transform(x, 4))


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "convolution"])
def test_first_use_anywhere_loads_the_kernels(kernels, monkeypatch, context):
    """The kernels load (and pass their check) whether first asked for under no_grad, in
    inference mode, or, as in training, inside the Winograd convolution's own forward."""
    monkeypatch.setattr(winograd_native, "_STATE", {})
    if context == "convolution":
        x, weight, scale, shift, _ = _case(1, 32, 16, 8, 8)
        winograd_conv3x3(x.requires_grad_(True), weight.requires_grad_(True), scale, shift, 4)
        assert winograd_native._STATE["kernels"] is not None
        return
    with torch.no_grad() if context == "no_grad" else torch.inference_mode():
        assert winograd_native.kernels() is not None
