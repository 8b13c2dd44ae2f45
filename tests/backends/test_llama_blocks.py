"""samplerkit's compiled kernels (``weights: blocks``, the default ``auto`` where they load):
exact products of the file's blocks, batch invariance by construction, the fused decode glue
against torch's own ops, the model against the exact one, the cache, and every way the kernels
can be unavailable (no AVX2, no compiler, switched off) falling back or failing clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams, _use_blocks, blocks, native
from samplerkit.builtins.backends.llama.blocks import BlockLinear
from samplerkit.builtins.backends.llama.quant import Int4Linear, QuantizedTensor, int4_kernel_available
from samplerkit.errors import ConfigError
from samplerkit.testing.tiny_models import GGUF_BLOCK_LAYOUT, random_gguf_blocks

needs_native = pytest.mark.skipif(native.kernels() is None,
                                  reason=f"compiled kernels unavailable here: {native.unavailable_reason()}")

#: The tile format each GGUF type gets (float16 scales where they are exact in float16).
FORMATS = {"Q4_0": "q4h", "Q4_1": "q4h", "Q4_K": "q4f", "Q8_0": "q8h"}


def _float32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A float32 summation bound for ``x @ w.T``: about K/8 + 16 roundings per output (8 lanes
    summed over the groups, then across lanes), each at most 2**-24 of the magnitudes' sum."""
    k = x.shape[-1]
    return (k / 8 + 16) * 2.0 ** -23 * (x.double().abs() @ w.double().abs().T) + 1e-30


@needs_native
@pytest.mark.parametrize("type_name", sorted(GGUF_BLOCK_LAYOUT))
def test_block_product_is_the_exact_models_product(type_name):
    """Each weight is the file's (gguf's dequantizer) and the activations stay float32: the
    product is the float64 one up to float32 summation, for 1 to 13 rows and the prefill copy."""
    rows, cols = 64, 512
    qt = QuantizedTensor(random_gguf_blocks(type_name, rows, cols, seed=11), type_name, (rows, cols))
    lin = BlockLinear.from_parts([qt])
    assert lin.format == FORMATS[type_name]
    w = qt.dense().double()
    x = torch.randn(13, cols, generator=torch.Generator().manual_seed(3))
    want = x.double() @ w.T
    for m in (1, 2, 3, 4, 8, 13):
        got = lin(x[:m])
        assert got.dtype == torch.float32 and got.shape == (m, rows)
        assert bool(((got.double() - want[:m]).abs() <= _float32_bound(x[:m], w)).all()), m
    dense = lin(x, dense=True)                   # the prefill's transient float32 copy
    assert bool(((dense.double() - want).abs() <= _float32_bound(x, w)).all())
    torch.testing.assert_close(lin.dense_t().t().double(), w, rtol=2 ** -23, atol=0)
    assert lin(x.view(13, 1, cols)).shape == (13, 1, rows)
    assert lin(x.bfloat16()).dtype == torch.bfloat16


@needs_native
def test_fused_matrices_and_a_padded_output_count():
    """Stacked matrices (q/k/v, gate/up) are one product; outputs not a multiple of the 4-row
    tile are padded inside and cut off in the result."""
    a = QuantizedTensor(random_gguf_blocks("Q4_1", 12, 256, seed=1), "Q4_1", (12, 256))
    b = QuantizedTensor(random_gguf_blocks("Q4_1", 6, 256, seed=2), "Q4_1", (6, 256))
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    fused, alone = BlockLinear.from_parts([a, b]), BlockLinear.from_parts([b])
    assert (fused.out_features, fused.rows, alone.out_features, alone.rows) == (18, 20, 6, 8)
    got = fused(x)
    assert got.shape == (5, 18)
    assert torch.equal(got[:, 12:], alone(x))
    w = torch.cat([a.dense(), b.dense()]).double()
    assert bool(((got.double() - x.double() @ w.T).abs() <= _float32_bound(x, w)).all())
    assert not blocks.can_block([a, QuantizedTensor(random_gguf_blocks("Q8_0", 4, 256), "Q8_0", (4, 256))],
                                torch.device("cpu"))          # one tile family per product
    assert not blocks.can_block([a], torch.device("meta"))
    assert not blocks.can_block([torch.zeros(4, 256)], torch.device("cpu"))


@needs_native
@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
def test_a_row_gets_the_same_bits_alone_in_any_batch_and_with_any_thread_count(type_name):
    rows, cols = 96, 576
    qt = QuantizedTensor(random_gguf_blocks(type_name, rows, cols, seed=6), type_name, (rows, cols))
    lin = BlockLinear.from_parts([qt])
    x = torch.randn(40, cols, generator=torch.Generator().manual_seed(8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([lin(x[i:i + 1]) for i in range(40)])
        torch.set_num_threads(2)
        for start, m in ((0, 40), (3, 1), (5, 2), (7, 3), (1, 4), (9, 7), (2, 8), (11, 9), (4, 17), (13, 27)):
            assert torch.equal(lin(x[start:start + m]), alone[start:start + m]), (start, m)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_fused_glue_matches_torchs_ops():
    """norm_mm, mm_add and mlp against F.rms_norm, the product and F.silu written out in torch."""
    gen = torch.Generator().manual_seed(0)
    k, inter = 64, 96
    qt = lambda rows, cols, seed: QuantizedTensor(random_gguf_blocks("Q4_1", rows, cols, seed), "Q4_1",  # noqa: E731
                                                  (rows, cols))
    w_qkv, w_o, w_gu, w_down = qt(128, k, 1), qt(k, k, 2), qt(2 * inter, k, 3), qt(k, inter, 4)
    lin = {n: BlockLinear.from_parts([q]) for n, q in (("qkv", w_qkv), ("o", w_o), ("gu", w_gu), ("down", w_down))}
    norm = 1 + 0.2 * torch.randn(k, generator=gen)
    h = torch.randn(3, 1, k, generator=gen)
    eps = 1e-5
    torch.testing.assert_close(blocks.norm_mm(h, norm, eps, lin["qkv"]),
                               lin["qkv"](F.rms_norm(h, (k,), norm, eps)), rtol=1e-5, atol=1e-5)
    a = torch.randn(3, k, generator=gen)
    got = h.clone()
    blocks.mm_add(a, lin["o"], got)
    torch.testing.assert_close(got, h + lin["o"](a).view(3, 1, k), rtol=1e-6, atol=1e-6)
    got = h.clone()
    blocks.mlp(got, norm, eps, lin["gu"], lin["down"])
    gate, up = lin["gu"](F.rms_norm(h, (k,), norm, eps)).chunk(2, dim=-1)
    torch.testing.assert_close(got, h + lin["down"](F.silu(gate) * up), rtol=1e-5, atol=1e-5)
    assert blocks.fusable([], [norm]) and not blocks.fusable([], [norm.double()])


def _attention_reference(qkv, heads, kv_heads, rope, pos, k_cache, v_cache, t, start):
    """The same step in torch ops: complex rotary, cache writes, softmax attention per row."""
    b, _, _, d = k_cache.shape
    qkv = qkv.clone()
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = torch.empty(b, heads * d)
    for i in range(b):
        row = qkv[i]
        qk = torch.view_as_complex(row[: (heads + kv_heads) * d].view(heads + kv_heads, d // 2, 2))
        qk = torch.view_as_real(qk * torch.view_as_complex(rope[pos[i]])).reshape(heads + kv_heads, d)
        q, k = qk[:heads], qk[heads:]
        v = row[(heads + kv_heads) * d:].view(kv_heads, d)
        k_cache[i, :, t], v_cache[i, :, t] = k, v
        keys, vals = k_cache[i, :, start[i]:t + 1], v_cache[i, :, start[i]:t + 1]
        for h in range(heads):
            j = h // (heads // kv_heads)
            p = torch.softmax(keys[j] @ q[h] / d ** 0.5, dim=-1)
            out[i, h * d:(h + 1) * d] = p @ vals[j]
    return out, k_cache, v_cache


@needs_native
def test_decode_attention_matches_torch_and_is_batch_invariant():
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, d, cap, t = 6, 2, 16, 12, 9
    angles = torch.outer(torch.arange(32.0), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    rope = torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).contiguous()
    qkv = torch.randn(4, 1, (heads + 2 * kv_heads) * d, generator=gen)
    k_cache = torch.randn(4, kv_heads, cap, d, generator=gen)
    v_cache = torch.randn(4, kv_heads, cap, d, generator=gen)
    start = torch.tensor([0, 3, 9, 5])                # left padding per row; row 2 sees one key
    pos = t - start
    want, want_k, want_v = _attention_reference(qkv.view(4, -1), heads, kv_heads, rope, pos, k_cache, v_cache, t,
                                                start)
    kc, vc = k_cache.clone(), v_cache.clone()
    got = blocks.attend_decode(qkv.clone(), heads, kv_heads, rope, pos, kc, vc, t, start)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc, want_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vc, want_v, rtol=0, atol=0)
    for i in range(4):                                # each row alone: the same bits
        kc1, vc1 = k_cache[i:i + 1].clone(), v_cache[i:i + 1].clone()
        alone = blocks.attend_decode(qkv[i:i + 1].clone(), heads, kv_heads, rope, pos[i:i + 1], kc1, vc1, t,
                                     start[i:i + 1])
        assert torch.equal(alone[0], got[i]), i


@pytest.fixture(scope="module")
def tiny_q41(hf_llama, tiny_tools, tmp_path_factory):
    model, cfg = hf_llama
    return tiny_tools.write_gguf(tmp_path_factory.mktemp("blocks") / "tiny-Q4_1.gguf", model, cfg,
                                 matrix_type="Q4_1", tokenizer=tiny_tools.train_byte_level_bpe())


@needs_native
@pytest.mark.parametrize("matrix_type", ["Q4_0", "Q4_1", "Q8_0"])
def test_block_model_is_the_exact_model_to_float32_rounding(tmp_path, hf_llama, tiny_tools, matrix_type):
    """A tiny GGUF: weights: blocks against weights: dequantize (the exact float32 model) over a
    prefill and 8 decode steps, and the fused decode step against the unfused one."""
    model, cfg = hf_llama
    path = tiny_tools.write_gguf(tmp_path / f"tiny-{matrix_type}.gguf", model, cfg, matrix_type=matrix_type,
                                 tokenizer=tiny_tools.train_byte_level_bpe())
    fast = LlamaBackend(LlamaParams(model=str(path), weights="blocks", cache=False))
    unfused = LlamaBackend(LlamaParams(model=str(path), weights="blocks", cache=False))
    unfused.model._fused = False
    exact = LlamaBackend(LlamaParams(model=str(path), weights="dequantize"))
    assert all(isinstance(m, BlockLinear) for m in fast.model.linears()) and fast.model._fused
    prompts = [[5, 6, 7, 8, 9], [1, 2], [100, 200, 50]]
    a, u, e = fast.prefill(prompts).last, unfused.prefill(prompts).last, exact.prefill(prompts).last
    for step in range(8):
        scale = e.abs().max().item()
        assert (a - e).abs().max().item() <= 1e-5 * scale, step
        assert (a - u).abs().max().item() <= 1e-5 * scale, step
        nxt = e.argmax(-1)
        a, u, e = fast.step(nxt), unfused.step(nxt), exact.step(nxt)


@needs_native
def test_block_weights_come_back_from_the_cache(tiny_q41, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMPLERKIT_CACHE", str(tmp_path / "cache"))
    first = LlamaBackend(LlamaParams(model=str(tiny_q41), weights="blocks"))
    assert list((tmp_path / "cache" / "models").glob("*.safetensors"))
    again = LlamaBackend(LlamaParams(model=str(tiny_q41), weights="blocks"))
    assert isinstance(again.model.layers[0].wqkv, BlockLinear) and again.model._fused
    assert torch.equal(again.model.layers[1].w_down.tiles, first.model.layers[1].w_down.tiles)
    prompts = [[5, 6, 7], [9]]
    a, b = first.prefill(prompts).last, again.prefill(prompts).last
    for _ in range(4):
        assert torch.equal(a, b)
        a, b = first.step(a.argmax(-1)), again.step(a.argmax(-1))


def test_weights_blocks_where_the_kernels_cannot_run_is_a_clear_error():
    with pytest.raises(ConfigError, match="backend.weights: 'blocks' needs samplerkit's compiled CPU kernels.*meta"):
        _use_blocks("blocks", torch.device("meta"))
    assert _use_blocks("auto", torch.device("meta")) is False
    assert _use_blocks("packed", torch.device("cpu")) is False


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SAMPLERKIT_QUIET": "1", **env})


PROBE = """
    import json, torch
    from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams, native
    from samplerkit.errors import ConfigError
    lib = native.kernels()
    out = {"loaded": lib is not None, "reason": native.unavailable_reason()}
    try:
        LlamaBackend(LlamaParams(model=MODEL, weights="blocks", cache=False))
    except ConfigError as exc:
        out["error"] = str(exc)
    auto = LlamaBackend(LlamaParams(model=MODEL, cache=False))
    out["auto"] = type(auto.model.layers[0].wqkv).__name__
    print(json.dumps(out))
"""


@pytest.mark.parametrize("env, reason, warned", [
    ({"SAMPLERKIT_NATIVE": "0"}, "SAMPLERKIT_NATIVE=0", False),
    ({"ATEN_CPU_CAPABILITY": "default"}, "capability DEFAULT", False),
    # Only where the CPU (as torch runs it here) takes the kernels: else that is the reason given.
    pytest.param({"CC": "/nonexistent/cc"}, "could not build the kernels", True, marks=needs_native),
])
def test_without_the_kernels_auto_falls_back_and_blocks_says_why(tiny_q41, tmp_path, env, reason, warned):
    """Switched off, a CPU (as torch runs it) without AVX2, or no working compiler: ``auto``
    keeps torch's int4 kernel, ``weights: blocks`` is a ConfigError that names the cause. Only
    the cause a user can fix (the compiler) makes ``auto`` warn."""
    import json

    run = _run(PROBE.replace("MODEL", repr(str(tiny_q41))), SAMPLERKIT_CACHE=str(tmp_path / "cache"), **env)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert not out["loaded"] and reason in out["reason"]
    assert "'blocks' needs samplerkit's compiled CPU kernels" in out["error"] and reason in out["error"]
    assert out["auto"] == ("Int4Linear" if int4_kernel_available() else "DenseLinear")
    assert ("Install a C compiler (gcc or clang) or set CC" in run.stderr) == warned, run.stderr
    assert not list((tmp_path / "cache").rglob("*.so"))


@needs_native
def test_two_processes_building_the_kernels_at_once(tmp_path):
    """Both load a complete library (each builds in a private file and renames it into place)."""
    code = """
        from samplerkit.builtins.backends.llama import native
        assert native.kernels() is not None, native.unavailable_reason()
        print("ok")
    """
    env = {**os.environ, "SAMPLERKIT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err
    built = list((tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so", built


@pytest.mark.slow
@needs_native
def test_default_model_runs_on_the_compiled_kernels_by_default(default_model_path):
    """The default model with the default options: every matrix and the decode glue compiled."""
    backend = LlamaBackend(LlamaParams())
    assert all(isinstance(m, BlockLinear) for m in backend.model.linears())
    assert backend.model._fused
    assert not any(isinstance(m, Int4Linear) for m in backend.model.linears())


@needs_native
def test_a_cache_directory_that_cannot_hold_the_kernels_builds_them_privately(tmp_path):
    """``kernels`` under the cache directory is a file (so nothing can be created there, even as
    root): the kernels are built into a private temporary directory and still load."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").write_text("not a directory")
    run = _run("""
        from samplerkit.builtins.backends.llama import native
        lib = native.kernels()
        assert lib is not None, native.unavailable_reason()
        print(lib._name)
    """, SAMPLERKIT_CACHE=str(tmp_path / "cache"))
    assert run.returncode == 0, run.stderr
    built = run.stdout.strip().splitlines()[-1]
    assert "samplerkit-kernels-" in built and not built.startswith(str(tmp_path))
    assert not os.path.exists(built)               # removed once loaded: nothing left behind in /tmp
    assert (tmp_path / "cache" / "kernels").read_text() == "not a directory"


@needs_native
def test_a_compiler_without_openmp_gets_single_threaded_kernels(tmp_path):
    """A compiler that rejects ``-fopenmp`` (Apple's clang, a clang without libomp): the kernels
    are built again without it and load (their parallel loops then run on one thread)."""
    import shutil

    log = tmp_path / "calls.log"
    cc = tmp_path / "cc-no-openmp"
    cc.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n"
                  f"case \" $* \" in *\" -fopenmp \"*) echo 'unsupported option -fopenmp' >&2; exit 1;; esac\n"
                  f"exec {shutil.which('cc') or shutil.which('gcc')} \"$@\"\n")
    cc.chmod(0o755)
    run = _run("""
        from samplerkit.builtins.backends.llama import native
        assert native.kernels() is not None, native.unavailable_reason()
        print("ok")
    """, SAMPLERKIT_CACHE=str(tmp_path / "cache"), CC=str(cc))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "-fopenmp" in calls[0] and "-fopenmp" not in calls[1], calls
