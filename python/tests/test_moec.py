"""The moec Python package against the command line's behaviour and an
independent NumPy reference of the tiny layer (softmax top-2, normalised,
SwiGLU experts)."""

import json
import pathlib

import numpy as np
import pytest

import moec

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "tiny.moe")


def test_check_accepts_a_file_and_text():
    moec.check(TINY)
    moec.check(pathlib.Path(TINY).read_text())


def test_check_raises_with_the_rendered_diagnostics():
    text = pathlib.Path(TINY).read_text().replace("top_k = 2", "top_k = 0")
    with pytest.raises(moec.MoeError) as e:
        moec.check(text)
    assert "top_k" in str(e.value)
    assert "<text>:" in str(e.value)


def test_compile_and_the_plan():
    plan = moec.compile(TINY)
    assert plan.text.startswith("moec plan v4: layer tiny")
    assert json.loads(plan.to_json())["layer"]["name"] == "tiny"
    sim = plan.simulate()
    assert sim["layer"] == "tiny" and sim["ranks"] == 4 and sim["total_us"] > 0
    assert "rewrites:" in plan.explain()
    small = moec.compile(TINY, tokens=8, hidden=32, dtype="bf16")
    assert json.loads(small.to_json())["layer"]["tokens_per_rank"] == 8
    with pytest.raises(ValueError):
        moec.compile(TINY, dtype="int8")
    with pytest.raises(moec.MoeError):
        moec.compile(TINY, tokens=0)


def test_a_layer_runs_on_one_array_and_on_a_list():
    layer = moec.Layer(moec.compile(TINY), seed=0)
    assert (layer.ranks, layer.tokens_per_rank, layer.hidden) == (4, 32, 64)
    x = moec.random_inputs(layer, seed=1)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == np.float32
    stats = layer.stats
    assert sum(stats["tokens_per_expert"]) == stats["assignments"] == 4 * 32 * 2
    assert stats["dropped"] == 0 and stats["imbalance"] >= 1.0
    parts = layer.forward([np.ascontiguousarray(p) for p in np.split(x, 4)])
    assert len(parts) == 4
    np.testing.assert_array_equal(np.concatenate(parts), y)
    # A plan's JSON works too.
    again = moec.Layer(moec.compile(TINY).to_json(), seed=0)(x)
    np.testing.assert_array_equal(again, y)


def reference(x, w, top_k=2):
    """The tiny layer in NumPy: softmax router, top-2 normalised, SwiGLU experts."""
    logits = x @ w["mlp.gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    picks = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, picks, -1)
    weights /= weights.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = picks[t, j]
            p = f"mlp.experts.{e}."
            g = x[t] @ w[p + "gate_proj.weight"].T
            u = x[t] @ w[p + "up_proj.weight"].T
            h = g / (1 + np.exp(-g)) * u
            y[t] += weights[t, j] * (h @ w[p + "down_proj.weight"].T)
    return y


def test_the_output_against_an_independent_reference():
    plan = moec.compile(TINY)
    layer = moec.Layer(plan, seed=3)
    w = {k: v.astype(np.float64) for k, v in moec.random_weights(plan, seed=3).items()}
    x = moec.random_inputs(layer, seed=4)
    y = layer(x)
    want = reference(x.astype(np.float64), w)
    err = np.abs(y - want).max() / np.abs(want).max()
    assert err < 1e-5, err


def test_weights_from_a_dict_of_arrays():
    """The weights Layer(plan, seed=3) draws, given back as a dict, make the
    same layer; a wrong shape or a missing tensor is moec's error."""
    plan = moec.compile(TINY)
    w = moec.random_weights(plan, seed=3)
    x = moec.random_inputs(moec.Layer(plan, seed=0), seed=4)
    np.testing.assert_array_equal(moec.Layer(plan, weights=w)(x), moec.Layer(plan, seed=3)(x))
    broken = dict(w)
    broken["mlp.gate.weight"] = broken["mlp.gate.weight"][:, :10].copy()
    with pytest.raises(moec.MoeError, match="mlp.gate.weight"):
        moec.Layer(plan, weights=broken)
    del broken["mlp.gate.weight"]
    with pytest.raises(moec.MoeError):
        moec.Layer(plan, weights=broken)
    with pytest.raises(ValueError, match="float32"):
        moec.Layer(plan, weights={"mlp.gate.weight": w["mlp.gate.weight"].astype(np.float64)})


def test_bad_inputs_are_value_errors_never_copies():
    layer = moec.Layer(moec.compile(TINY), seed=0)
    x = moec.random_inputs(layer)
    with pytest.raises(ValueError, match="float32"):
        layer(x.astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        layer(x[:10])
    with pytest.raises(ValueError, match="C-contiguous"):
        layer(np.asfortranarray(x))
    with pytest.raises(ValueError, match="arrays for 4 ranks"):
        layer([x[:32]])
    with pytest.raises(ValueError, match="float32"):
        layer("not an array")
    with pytest.raises(ValueError, match="backend"):
        moec.Layer(moec.compile(TINY), backend="tpu")
    assert layer.device == "cpu"
    with pytest.raises(TypeError):
        moec.Layer(42)
    with pytest.raises(moec.MoeError, match="not a moec plan"):
        moec.Layer("{}")
    with pytest.raises(moec.MoeError):
        moec.Layer(moec.compile(TINY), weights="/no/such/file.safetensors")
    nan = x.copy()
    nan[3, 5] = np.nan
    with pytest.raises(moec.MoeError, match="NaN"):
        layer(nan)


def test_a_contiguous_float32_input_is_read_in_place():
    """The pass reads the caller's buffer itself (the slices it hands the
    runtime start at the array's data), a read-only array is accepted, and
    the array is unchanged afterwards."""
    layer = moec.Layer(moec.compile(TINY), seed=0)
    x = moec.random_inputs(layer, seed=2)
    assert layer._input_address(x) == x.ctypes.data
    before = x.copy()
    x.setflags(write=False)
    layer(x)
    np.testing.assert_array_equal(x, before)


def test_the_book_page_examples_run(monkeypatch, capsys):
    """Every Python block of the book's page runs as shown (from the repository root)."""
    import re

    page = (ROOT / "book" / "src" / "python.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(ROOT)
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    for block in blocks:
        if block.startswith("import torch") and not have_torch:
            continue  # the PyTorch comparison runs where PyTorch is installed
        exec(compile(block, "book/src/python.md", "exec"), {})


class Tensor:
    """A framework's tensor that NumPy knows nothing of: it offers its data
    through DLPack only (as PyTorch, JAX or CuPy do)."""

    def __init__(self, array, device=(1, 0)):
        self.array = array
        self.device = device

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.device


def from_dlpack(x):
    """This module's `from_dlpack`: where moec hands a Tensor input's output."""
    return Tensor(np.from_dlpack(x))


def test_a_dlpack_tensor_is_read_in_place_and_its_output_is_of_its_kind():
    layer = moec.Layer(moec.compile(TINY), seed=0)
    x = moec.random_inputs(layer, seed=5)
    t = Tensor(x)
    assert layer._input_address(t) == x.ctypes.data
    y = layer(t)
    assert isinstance(y, Tensor)
    np.testing.assert_array_equal(y.array, layer(x))
    parts = layer([Tensor(np.ascontiguousarray(p)) for p in np.split(x, 4)])
    assert all(isinstance(p, Tensor) for p in parts)
    np.testing.assert_array_equal(np.concatenate([p.array for p in parts]), y.array)


def test_bad_dlpack_tensors_are_value_errors():
    layer = moec.Layer(moec.compile(TINY), seed=0)
    x = moec.random_inputs(layer)
    with pytest.raises(ValueError, match="float32"):
        layer(Tensor(x.astype(np.float64)))
    with pytest.raises(ValueError, match="shape"):
        layer(Tensor(x[:10]))
    with pytest.raises(ValueError, match="C-contiguous"):
        layer(Tensor(np.asfortranarray(x)))
    with pytest.raises(ValueError, match="2-D"):
        layer(Tensor(x.reshape(-1)))
    with pytest.raises(ValueError, match="CUDA device"):
        layer(Tensor(x, device=(2, 0)))
    # The tensor is still usable after a refused call (the capsule's deleter ran once).
    np.testing.assert_array_equal(layer(Tensor(x)).array, layer(x))


def test_torch_tensors_in_and_out():
    """PyTorch, when installed (CI runs NumPy only; PyTorch's wheel is
    gigabytes): a CPU float32 tensor is read in place and the output is a
    tensor; a CUDA, float64 or transposed tensor is a ValueError."""
    torch = pytest.importorskip("torch")
    layer = moec.Layer(moec.compile(TINY), seed=0)
    x = moec.random_inputs(layer, seed=6)
    t = torch.from_numpy(x.copy())
    assert layer._input_address(t) == t.data_ptr()
    y = layer(t)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), layer(x))
    with pytest.raises(ValueError, match="float32"):
        layer(t.double())
    with pytest.raises(ValueError, match="C-contiguous"):
        layer(t.t().contiguous().t())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            layer(t.cuda())


def test_the_cuda_backend_runs_or_says_why_not():
    """Without a GPU (CI) the CUDA backend is moec's error naming what is
    missing; with one, it gives the CPU backend's output."""
    plan = moec.compile(TINY)
    x = moec.random_inputs(moec.Layer(plan, seed=0), seed=7)
    try:
        gpu = moec.Layer(plan, seed=0, backend="cuda")
    except moec.MoeError as e:
        assert any(w in str(e) for w in ("CUDA", "GPU", "driver")), str(e)
        return
    assert gpu.device != "cpu"
    want = moec.Layer(plan, seed=0)(x)
    got = gpu(x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
