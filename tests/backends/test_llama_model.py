"""The llama backend's math against transformers' LlamaForCausalLM on a tiny random model.

Reference for every row: HF's full forward over the row's own (unpadded) tokens, so one check
covers prefill, cached decode steps, left padding and grouped-query attention.
"""

from __future__ import annotations

import pytest
import torch

from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams

TOL = 1e-4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3], [100, 200, 50, 60, 70], [42]]
STEPS = 16


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def run(backend, prompts, steps=STEPS, keep_all_logits=False):
    """Prefill then feed a fixed token schedule; returns (per-row sequences, per-row logits
    [steps + 1, V] at each generated position, prefill 'all' logits)."""
    out = backend.prefill(prompts, keep_all_logits=keep_all_logits)
    seqs = [list(p) for p in prompts]
    logits = [[out.last[i]] for i in range(len(prompts))]
    for s in range(steps):
        nxt = torch.tensor([(17 * s + 31 * i + 1) % 280 for i in range(len(prompts))])
        for i in range(len(prompts)):
            seqs[i].append(int(nxt[i]))
        step_logits = backend.step(nxt)
        assert step_logits.dtype == torch.float32
        for i in range(len(prompts)):
            logits[i].append(step_logits[i])
    return seqs, [torch.stack(rows) for rows in logits], out.all


@pytest.fixture(scope="module")
def backend(hf_dir):
    return LlamaBackend(LlamaParams(model=str(hf_dir)))


def test_batched_prefill_and_decode_match_transformers(backend, hf_llama):
    model, _ = hf_llama
    seqs, logits, every = run(backend, PROMPTS, keep_all_logits=True)
    for prompt, seq, got, got_all in zip(PROMPTS, seqs, logits, every, strict=True):
        ref = hf_logits(model, seq)
        n = len(prompt)
        assert (got - ref[n - 1:]).abs().max().item() <= TOL
        assert got_all.shape == (n, 300)
        assert (got_all - ref[:n]).abs().max().item() <= TOL


@pytest.mark.parametrize("invariant", [True, False])
def test_padding_never_changes_a_rows_logits(backend, invariant):
    backend.model.batch_invariant = invariant      # False: one masked fused attention call per layer
    try:
        _, batched, _ = run(backend, PROMPTS)
    finally:
        backend.model.batch_invariant = True
    for i, prompt in enumerate(PROMPTS):
        # Row i alone, fed the same schedule it got in the batch.
        out = backend.prefill([prompt])
        alone = [out.last[0]]
        for s in range(STEPS):
            alone.append(backend.step(torch.tensor([(17 * s + 31 * i + 1) % 280]))[0])
        assert (torch.stack(alone) - batched[i]).abs().max().item() <= 1e-5


def test_select_rows_compacts_and_duplicates(backend, hf_llama):
    model, _ = hf_llama
    out = backend.prefill(PROMPTS)
    first = out.last.argmax(-1)
    backend.select_rows([2, 0, 0])        # drop rows 1 and 3, duplicate row 0
    nxt = first[[2, 0, 0]]
    seqs = [PROMPTS[2] + [int(nxt[0])], PROMPTS[0] + [int(nxt[1])], PROMPTS[0] + [int(nxt[2])]]
    for _ in range(5):
        logits = backend.step(nxt)
        assert torch.equal(logits[1], logits[2])
        for j in range(3):
            assert (logits[j] - hf_logits(model, seqs[j])[-1]).abs().max().item() <= TOL
        nxt = logits.argmax(-1)
        for j in range(3):
            seqs[j].append(int(nxt[j]))
    backend.select_rows([1])
    assert backend.step(nxt[[1]]).shape == (1, 300)


def test_cache_grows_past_its_first_allocation(hf_dir, hf_llama):
    model, _ = hf_llama
    backend = LlamaBackend(LlamaParams(model=str(hf_dir), max_context=256))
    prompt = list(range(3, 40))
    seqs, logits, _ = run(backend, [prompt], steps=256 - len(prompt))
    ref = hf_logits(model, seqs[0])
    assert (logits[0] - ref[len(prompt) - 1:]).abs().max().item() <= TOL
    from samplerkit.errors import GenerationError
    with pytest.raises(GenerationError, match="context of 256"):
        backend.step(torch.tensor([1]))


def test_bfloat16_stays_close(hf_dir, backend):
    bf16 = LlamaBackend(LlamaParams(model=str(hf_dir), dtype="bfloat16"))
    ref = backend.prefill(PROMPTS).last
    got = bf16.prefill(PROMPTS).last
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("matrix_type", ["F32", "Q8_0"])
def test_gguf_round_trip_matches_transformers(tmp_path, hf_llama, tiny_tools, matrix_type):
    """A GGUF written like llama.cpp's converter (permuted Q/K, Q8_0 matrices) loads back to HF's
    logits; for Q8_0 the reference is HF with the same quantize->dequantize applied."""
    import gguf

    model, cfg = hf_llama
    path = tiny_tools.write_gguf(tmp_path / f"tiny-{matrix_type}.gguf", model, cfg, matrix_type=matrix_type,
                                 tokenizer=tiny_tools.train_byte_level_bpe())
    ref_model = model
    if matrix_type != "F32":
        import copy
        qtype = getattr(gguf.GGMLQuantizationType, matrix_type)
        ref_model = copy.deepcopy(model)
        with torch.no_grad():
            for _, p in ref_model.named_parameters():
                if p.ndim == 2:
                    q = gguf.quants.quantize(p.numpy(), qtype)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype)))
    backend = LlamaBackend(LlamaParams(model=str(path), weights="dequantize"))
    assert not backend.model.packed
    seqs, logits, _ = run(backend, PROMPTS)
    for prompt, seq, got in zip(PROMPTS, seqs, logits, strict=True):
        ref = hf_logits(ref_model, seq)
        assert (got - ref[len(prompt) - 1:]).abs().max().item() <= TOL
    assert backend.vocab_size == 300
    assert backend.eos_token_ids == frozenset({1})


def test_gguf_tokenizer_equals_tokenizer_json(tmp_path, hf_llama, hf_dir, tiny_tools):
    model, cfg = hf_llama
    path = tiny_tools.write_gguf(tmp_path / "tok.gguf", model, cfg, tokenizer=tiny_tools.train_byte_level_bpe())
    from_gguf = LlamaBackend(LlamaParams(model=str(path)))
    from_json = LlamaBackend(LlamaParams(model=str(hf_dir)))
    for text in (tiny_tools.TEXT[:200], "Sphinx 1234 <s>fox</s> it's", "  leading spaces\n\ttabs"):
        ids = from_gguf.tokenize(text)
        assert ids == from_json.tokenize(text)
        assert ids[0] == 0                      # add_bos_token
        assert from_gguf.detokenize(ids) == text.replace("<s>", "").replace("</s>", "")
    assert from_gguf.tokenize("fox", add_special=False)[0] != 0


def test_chat_template_is_rendered(backend):
    text = backend.apply_chat_template("hello")
    assert text == "<|user|>hello</s><|assistant|>"
    ids = backend.tokenize(text)
    assert ids.count(0) == 1                     # one BOS, not two


def test_threads_and_params(hf_dir):
    import pydantic

    with pytest.raises(pydantic.ValidationError):
        LlamaParams(dtype="float16")
    with pytest.raises(pydantic.ValidationError):
        LlamaParams(max_context=0)
    assert {f["name"] for f in LlamaParams.describe_fields()} == {"model", "device", "dtype", "weights", "max_context", "cache",
                                                                   "threads", "batch_invariant"}
    assert all(f["description"] for f in LlamaParams.describe_fields())


@pytest.fixture(scope="module", params=["packed", "auto"])
def packed_tiny(request, tmp_path_factory, tiny_tools):
    """A tiny Q4_1 GGUF whose matrices run on the file's codes (vocabulary 320: a multiple of the
    int4 kernel's 16 outputs, so the output projection can be packed too, as in the default
    model), with ``weights: packed`` (every matrix through torch's int4 kernel) and ``auto`` (the
    default: every matrix through samplerkit's compiled kernels where they load, else packed
    layers with the output matrix in float16)."""
    transformers = pytest.importorskip("transformers", reason="builds the tiny model")
    from samplerkit.builtins.backends.llama import native
    from samplerkit.builtins.backends.llama.blocks import BlockLinear
    from samplerkit.builtins.backends.llama.quant import (
        Fp16Linear,
        Int4Linear,
        fp16_kernel_available,
        int4_kernel_available,
    )
    from samplerkit.testing.tiny_models import TINY_LLAMA

    if not int4_kernel_available():
        pytest.skip("this torch has no int4 CPU kernel: no packed model to test")
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(**{**TINY_LLAMA, "vocab_size": 320}, bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    path = tiny_tools.write_gguf(tmp_path_factory.mktemp("packed") / "tiny-Q4_1.gguf", model, cfg,
                                 matrix_type="Q4_1", tokenizer=tiny_tools.train_byte_level_bpe())
    backend = LlamaBackend(LlamaParams(model=str(path), cache=False, weights=request.param))
    *layers, head = backend.model.linears()
    if request.param == "auto" and native.kernels() is not None:
        assert all(isinstance(m, BlockLinear) for m in [*layers, head])
        assert backend.model._fused                 # decode steps run the fused compiled calls
        return backend
    assert all(isinstance(m, Int4Linear) for m in layers)
    # auto without the compiled kernels: the output matrix in float16 where fbgemm's GEMM runs.
    want_head = Fp16Linear if request.param == "auto" and fp16_kernel_available() else Int4Linear
    assert isinstance(head, want_head)
    return backend


def _schedule(i: int, s: int) -> int:
    """The token fed to prompt ``i`` at step ``s`` (the same alone and in any batch)."""
    return (17 * s + 31 * i + 1) % 280


# Different lengths, one long enough for the prefill's dense-copy path (DENSE_ROWS tokens).
INVARIANCE_PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3], [(7 * i + 3) % 280 for i in range(140)],
                      [42], [100, 200, 50, 60, 70]]


def test_a_row_is_bit_identical_alone_and_in_any_batch(packed_tiny):
    """Batch invariance of the paths on the file's codes (`packed`, and the default `auto`): a prompt's logits at every step are the
    same bits alone, in batches of 2 and 5 in any order, with rows dropped (finished) and
    duplicated (n fan-out) mid-generation."""
    steps = 6
    alone = {}
    for i, prompt in enumerate(INVARIANCE_PROMPTS):
        rows = [packed_tiny.prefill([prompt]).last[0]]
        for s in range(steps):
            rows.append(packed_tiny.step(torch.tensor([_schedule(i, s)]))[0])
        alone[i] = rows
    for order in ([1, 0], [2, 4], [3, 0, 4, 1, 2], [2, 2, 0, 1, 3]):
        got = packed_tiny.prefill([INVARIANCE_PROMPTS[i] for i in order]).last
        for j, i in enumerate(order):
            assert torch.equal(got[j], alone[i][0]), (order, j)
        live = list(order)
        for s in range(steps):
            if s == 2 and len(live) > 2:            # the first row finishes, the last is duplicated
                keep = list(range(1, len(live))) + [len(live) - 1]
                packed_tiny.select_rows(keep)
                live = [live[k] for k in keep]
            got = packed_tiny.step(torch.tensor([_schedule(i, s) for i in live]))
            for j, i in enumerate(live):
                assert torch.equal(got[j], alone[i][s + 1]), (order, s, j)


def test_a_join_that_raises_leaves_the_running_rows_as_they_were(hf_dir, monkeypatch):
    """``join_is_atomic``: a join whose prefill fails part-way (here, in the second layer pass
    of the new prompt) restores the cache, so the running rows' next steps are the bits they get
    from a backend that never tried to join."""
    tried = LlamaBackend(LlamaParams(model=str(hf_dir)))
    never = LlamaBackend(LlamaParams(model=str(hf_dir)))
    prompts = [[5, 6, 7, 8], [9, 10]]
    a, b = tried.prefill(prompts).last, never.prefill(prompts).last
    a, b = tried.step(a.argmax(-1)), never.step(b.argmax(-1))
    real_fill = type(tried.model)._fill

    def broken_fill(self, *args, **kwargs):
        raise MemoryError("out of memory while prefilling the new row")

    monkeypatch.setattr(type(tried.model), "_fill", broken_fill)
    with pytest.raises(MemoryError):
        tried.join([[1, 2, 3, 4, 5, 6, 7, 8, 9]])          # longer than the running rows: re-pads them
    monkeypatch.setattr(type(tried.model), "_fill", real_fill)
    assert tried.model.batch_size == 2 and type(tried).join_is_atomic
    for _ in range(3):
        nxt = b.argmax(-1)
        a, b = tried.step(nxt), never.step(nxt)
        assert torch.equal(a, b)
    joined = tried.join([[11, 12]]).last                   # and it can join afterwards
    assert joined.shape[0] == 1 and tried.model.batch_size == 3
