"""The ONNX Runtime fused engine (`build.graph: fused`, the default) against the portable engine
built from the same export: same weights, same outputs, KV cache updated in place, batch > 1."""

import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from pipeline.artifacts import OnnxModel, read_manifest
from pipeline.errors import StageFailed
from pipeline.metrics import perplexity
from pipeline.modeling import runtime
from pipeline.modeling.decoder import DecoderSpec
from pipeline.modeling.runtime import (
    OPENVINO_MIN_TOKENS,
    FusedOrtCausalLM,
    MissingRuntime,
    OpenVinoPaged,
    OpenVinoPrefill,
    SequenceTooLong,
    greedy_decode,
)
from pipeline.modeling.weights import OnnxWeights
from pipeline.quantization.format import load_quantized
from pipeline.recipe import BuildConfig
from pipeline.registry.mlflow_model import runtime_libraries
from pipeline.stages.validate import score
from pipeline.targets.onnxruntime_ep import (
    BATCH_CHECK_ROWS,
    BATCH_KERNEL_RTOL,
    OPENVINO_PREFILL_RTOL,
    OnnxRuntime,
    compare_decoders,
    op_counts,
)


@pytest.fixture(scope="module")
def engines(tiny_run, tmp_path_factory):
    """Both graph kinds built from the tiny run's export, with a short max_sequence_length."""
    exported = OnnxModel(path=tiny_run["paths"]["export"], meta=read_manifest(tiny_run["paths"]["export"])["meta"])
    built = {}
    for graph in ("portable", "fused"):
        out = tmp_path_factory.mktemp(graph)
        meta = OnnxRuntime("onnxruntime-cpu").build(exported, out, BuildConfig(graph=graph, max_sequence_length=64), lambda _m: None)
        built[graph] = SimpleNamespace(path=out, meta=meta, lm=OnnxRuntime("onnxruntime-cpu").load(out, meta))
    return built


def test_fused_graph_reads_back_the_exported_codes_unchanged(tiny_run):
    spec = DecoderSpec.from_dict(read_manifest(tiny_run["paths"]["export"])["meta"]["decoder"])
    quantized = OnnxWeights(spec, onnx.load(str(tiny_run["paths"]["export"] / "model.onnx"))).quantized_layers()
    original = load_quantized(tiny_run["paths"]["quantize"] / "quantized.safetensors")
    assert set(quantized) == set(original)
    for name, layer in original.items():
        np.testing.assert_array_equal(quantized[name].codes, layer.codes)
        np.testing.assert_array_equal(quantized[name].scales, layer.scales)
        np.testing.assert_array_equal(quantized[name].zeros, layer.zeros)
        assert quantized[name].group_size == layer.group_size


def test_build_checked_the_fusion_and_recorded_it(engines):
    check = engines["fused"].meta["fusion_check"]
    assert check["greedy_tokens_equal"] and check["max_rel_logit_diff"] < 1e-4
    assert isinstance(engines["fused"].lm, FusedOrtCausalLM)
    assert "GroupQueryAttention" not in engines["portable"].meta["op_counts"]


def test_same_perplexity_and_greedy_tokens_as_the_portable_engine(engines):
    windows = [np.random.default_rng(s).integers(0, 257, size=40).astype(np.int64) for s in range(4)]
    nll_p, n, pred_p = score(engines["portable"].lm, windows, lambda _n: None)
    nll_f, _, pred_f = score(engines["fused"].lm, windows, lambda _n: None)
    assert abs(perplexity(nll_f, n) / perplexity(nll_p, n) - 1) < 1e-5
    np.testing.assert_array_equal(pred_f, pred_p)
    prompt = windows[0][:12]
    tokens_p, _, _ = greedy_decode(engines["portable"].lm, prompt, 20, lambda: 0.0)
    tokens_f, _, _ = greedy_decode(engines["fused"].lm, prompt, 20, lambda: 0.0)
    assert tokens_f == tokens_p


def test_decode_writes_the_kv_cache_in_place(engines):
    lm = engines["fused"].lm
    _, state = lm.forward(np.array([[5, 6, 7]], dtype=np.int64), None)
    key0 = state.cache["arrays"][0]
    pointer = key0.ctypes.data
    before = key0.copy()
    _, state2 = lm.forward(np.array([[8]], dtype=np.int64), state)
    after = state2.cache["arrays"][0]
    assert after.ctypes.data == pointer and state2.length == 4
    np.testing.assert_array_equal(after[:, :, :3], before[:, :, :3])  # earlier positions untouched
    assert np.abs(after[:, :, 3]).sum() > 0 and np.abs(before[:, :, 3]).sum() == 0  # the new token's keys, in place


def test_batch_rows_match_single_sequences(engines):
    lm = engines["fused"].lm
    prompts = np.random.default_rng(3).integers(0, 257, size=(3, 10)).astype(np.int64)
    batched = compare_decoders(engines["portable"].lm, lm, vocab=257, batch=3, steps=6)
    assert batched["greedy_tokens_equal"]
    logits_b, _ = lm.forward(prompts, None)
    for row in range(3):
        logits_1, _ = lm.forward(prompts[row:row + 1], None)
        np.testing.assert_allclose(logits_b[row], logits_1[0], atol=1e-5, rtol=1e-5)


def test_two_live_sequences_do_not_share_a_cache(engines):
    lm = engines["fused"].lm
    a_logits, a_state = lm.forward(np.array([[1, 2, 3, 4]], dtype=np.int64), None)
    _, _ = lm.forward(np.array([[9, 9, 9, 9, 9, 9]], dtype=np.int64), None)  # another sequence in between
    cont, _ = lm.forward(np.array([[5]], dtype=np.int64), a_state)
    whole, _ = lm.forward(np.array([[1, 2, 3, 4, 5]], dtype=np.int64), None)
    np.testing.assert_allclose(cont[0, -1], whole[0, -1], atol=1e-5, rtol=1e-5)


def test_sequence_past_max_length_is_a_clear_error(engines):
    with pytest.raises(SequenceTooLong, match="exceeds the engine's max_sequence_length 64"):
        engines["fused"].lm.forward(np.zeros((1, 65), dtype=np.int64), None)


def test_rows_of_different_lengths_decode_as_if_alone(engines):
    """Concurrent requests: right-padded prompts with per-row lengths, then decode steps in which
    each row continues from its own position."""
    lm = engines["fused"].lm
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 257, size=n).astype(np.int64) for n in (10, 6)]
    padded = np.zeros((2, 10), dtype=np.int64)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
    logits, state = lm.forward(padded, None, lengths=np.array([10, 6]))
    batched = [[logits[row, len(p) - 1]] for row, p in enumerate(prompts)]
    for step in range(4):
        next_ids = np.array([[step + 1], [step + 2]], dtype=np.int64)
        logits, state = lm.forward(next_ids, state, lengths=np.array([1, 1]))
        for row in range(2):
            batched[row].append(logits[row, 0])
    for row, p in enumerate(prompts):
        alone, st = lm.forward(p[None, :], None)
        expected = [alone[0, -1]]
        for step in range(4):
            alone, st = lm.forward(np.array([[step + 1 + row]], dtype=np.int64), st)
            expected.append(alone[0, 0])
        np.testing.assert_allclose(np.stack(batched[row]), np.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def openvino_engine(tiny_run, tmp_path_factory):
    """The fused engine with its prompts on OpenVINO (`build.prefill_runtime: openvino`), and its
    decode steps of 3+ rows too (`build.batch_kernel: openvino_paged`)."""
    exported = OnnxModel(path=tiny_run["paths"]["export"], meta=read_manifest(tiny_run["paths"]["export"])["meta"])
    out = tmp_path_factory.mktemp("openvino")
    cfg = BuildConfig(prefill_runtime="openvino", batch_kernel="openvino_paged", batch_kernel_min_rows=3, max_sequence_length=256)
    meta = OnnxRuntime("onnxruntime-cpu").build(exported, out, cfg, lambda _m: None)
    return SimpleNamespace(path=out, meta=meta, lm=OnnxRuntime("onnxruntime-cpu").load(out, meta), exported=exported)


def test_openvino_prompts_give_the_decode_kernels_logits(openvino_engine):
    check = openvino_engine.meta["openvino_prefill_check"]
    assert check["max_rel_logit_diff"] < OPENVINO_PREFILL_RTOL and check["prompt_len"] == 3 * OPENVINO_MIN_TOKENS
    assert check["decode_kernel_max_rel_logit_diff"] < 1e-5  # fp32 compute: the decode kernel is exact math
    assert sorted(p.name for p in openvino_engine.path.iterdir() if p.suffix == ".onnx") == ["engine.onnx"]
    assert openvino_engine.meta["session_options"]["prefill_runtime"] == "openvino"
    lm = openvino_engine.lm
    assert lm.openvino is not None and lm.without_prefill().openvino is None
    rng = np.random.default_rng(3)
    long_prompt = rng.integers(0, 257, size=(1, 2 * OPENVINO_MIN_TOKENS))
    ov_logits, ov_state = lm.forward(long_prompt, None)
    kernel_logits, kernel_state = lm.without_prefill().forward(long_prompt, None)
    assert np.abs(ov_logits - kernel_logits).max() / np.abs(kernel_logits).max() < OPENVINO_PREFILL_RTOL
    assert not np.array_equal(ov_logits, kernel_logits)  # it did run elsewhere
    # the chunk's keys and values are in the row's buffers, where the decode kernel reads them
    ov_kv, kernel_kv = lm.read_positions(ov_state, 0, 0, long_prompt.shape[1]), lm.read_positions(kernel_state, 0, 0, long_prompt.shape[1])
    assert np.abs(ov_kv - kernel_kv).max() / np.abs(kernel_kv).max() < OPENVINO_PREFILL_RTOL
    assert not lm.read_positions(ov_state, 0, long_prompt.shape[1], 256).any()
    # a second chunk after that past (OpenVINO's outputs are views it reuses on the next call): its
    # logits, and both chunks' keys and values, as the decode kernel gives them
    second = rng.integers(0, 257, size=(1, OPENVINO_MIN_TOKENS))
    ov_logits, ov_state = lm.forward(second, ov_state)
    kernel_logits, kernel_state = lm.without_prefill().forward(second, kernel_state)
    assert np.abs(ov_logits - kernel_logits).max() / np.abs(kernel_logits).max() < OPENVINO_PREFILL_RTOL
    total = long_prompt.shape[1] + second.shape[1]
    ov_kv, kernel_kv = lm.read_positions(ov_state, 0, 0, total), lm.read_positions(kernel_state, 0, 0, total)
    assert np.abs(ov_kv - kernel_kv).max() / np.abs(kernel_kv).max() < OPENVINO_PREFILL_RTOL
    # a past OpenVINO's cache does not hold is copied in: one the decode kernel wrote...
    def close(logits, reference):
        return np.abs(logits - reference).max() / np.abs(reference).max() < OPENVINO_PREFILL_RTOL

    assert isinstance(lm.openvino, OpenVinoPaged) and openvino_engine.meta["openvino_prefill_check"]["openvino_attention"] == "PagedAttention"
    _, kernel_past = lm.without_prefill().forward(long_prompt, None)
    assert close(lm.forward(second, kernel_past)[0], kernel_logits)
    # ...and one written over the positions OpenVINO itself wrote (a prefix-cache load)
    other = rng.integers(0, 257, size=(1, 2 * OPENVINO_MIN_TOKENS))
    _, ov_state = lm.forward(long_prompt, None)
    _, other_state = lm.without_prefill().forward(other, None)
    lm.write_positions(ov_state, 0, 0, lm.read_positions(other_state, 0, 0, other.shape[1]))
    after_other, _ = lm.without_prefill().forward(second, other_state)
    assert close(lm.forward(second, ov_state)[0], after_other)
    # short chunks stay on the decode kernel: the same numbers bit for bit
    short = long_prompt[:, :OPENVINO_MIN_TOKENS - 1]
    np.testing.assert_array_equal(lm.forward(short, None)[0], lm.without_prefill().forward(short, None)[0])


def test_the_openvino_check_fails_when_chunk_keys_and_values_are_not_written(openvino_engine, tmp_path, monkeypatch):
    original = OpenVinoPaged.run

    def forgets_the_cache(self, input_ids, arrays, past, last_only, row=None):  # writes the chunk into copies
        return original(self, input_ids, [array.copy() for array in arrays], past, last_only, row)

    monkeypatch.setattr(OpenVinoPaged, "run", forgets_the_cache)
    with pytest.raises(StageFailed, match="prompts on OpenVINO do not give the engine's logits"):
        OnnxRuntime("onnxruntime-cpu").build(openvino_engine.exported, tmp_path, BuildConfig(prefill_runtime="openvino", max_sequence_length=256),
                                             lambda _m: None)


def test_openvino_prompts_fall_back_to_the_frontends_graph_when_the_paged_rewrite_fails(openvino_engine, monkeypatch):
    def another_release(model):
        raise RuntimeError("PagedAttensionExtension expects 29 inputs, but it has 28")

    monkeypatch.setattr(runtime, "paged_attention_graph", another_release)
    lm = OnnxRuntime("onnxruntime-cpu").load(openvino_engine.path, openvino_engine.meta)
    assert isinstance(lm.openvino, OpenVinoPrefill) and "expects 29 inputs" in lm.openvino.attention
    prompt = np.random.default_rng(5).integers(0, 257, size=(1, 2 * OPENVINO_MIN_TOKENS))
    logits, reference = lm.forward(prompt, None)[0], lm.without_prefill().forward(prompt, None)[0]
    assert np.abs(logits - reference).max() / np.abs(reference).max() < OPENVINO_PREFILL_RTOL


class CountingRequest:
    """An OpenVINO infer request that counts its calls."""

    def __init__(self, request):
        self.request, self.calls = request, 0

    def infer(self, *args, **kwargs):
        self.calls += 1
        return self.request.infer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.request, name)


def rows_of_lengths(lm, lengths, rng):
    """A batch state whose rows hold random prompts of these lengths, prefilled on the decode kernel."""
    state = lm.empty_state(len(lengths))
    for row, length in enumerate(lengths):
        view = lm.row_view(state, row, 1)
        _, view = lm.forward(rng.integers(0, 257, size=(1, length)), view, kernel="decode")
        state.cache["row_lengths"][row] = view.cache["row_lengths"][0]
    return state


def test_openvino_decodes_many_rows_of_different_lengths_near_the_engines_kernel(openvino_engine, monkeypatch):
    check = openvino_engine.meta["batch_kernel_check"]
    assert check["rows"] == BATCH_CHECK_ROWS and check["max_rel_logit_diff"] <= check["decode_kernel_max_rel_logit_diff"] + BATCH_KERNEL_RTOL
    assert openvino_engine.meta["session_options"]["batch_kernel"] == "openvino_paged"
    lm = openvino_engine.lm
    monkeypatch.setattr(lm.openvino, "request", CountingRequest(lm.openvino.request))
    for lengths in ((7, 20), (7, 20, 3), (40, 1, 33, 12, 5)):
        seed = sum(lengths)
        state, kernel_state = rows_of_lengths(lm, lengths, np.random.default_rng(seed)), rows_of_lengths(lm, lengths, np.random.default_rng(seed))
        token = np.random.default_rng(seed).integers(0, 257, size=(len(lengths), 1))
        calls = lm.openvino.request.calls
        logits, state = lm.forward(token, state)
        kernel_logits, kernel_state = lm.forward(token, kernel_state, kernel="decode")
        assert lm.openvino.request.calls - calls == int(len(lengths) >= 3)
        if len(lengths) < 3:
            np.testing.assert_array_equal(logits, kernel_logits)
            continue
        assert not np.array_equal(logits, kernel_logits)
        assert np.abs(logits - kernel_logits).max() / np.abs(kernel_logits).max() < BATCH_KERNEL_RTOL
        for row, length in enumerate(lengths):  # each row's new keys and values at its own position, in its buffers
            ov_kv, kernel_kv = lm.read_positions(state, row, 0, length + 2), lm.read_positions(kernel_state, row, 0, length + 2)
            assert np.abs(ov_kv - kernel_kv).max() / np.abs(kernel_kv).max() < OPENVINO_PREFILL_RTOL
            assert not ov_kv[:, :, length + 1].any()


def test_openvino_steps_see_positions_the_decode_kernel_wrote_over(openvino_engine):
    """A step on OpenVINO, a rollback of one position (a rejected draft) rewritten by the decode
    kernel with another token, then OpenVINO again: it must read the new keys and values, not the
    ones its mirror held."""
    lm, rng = openvino_engine.lm, np.random.default_rng(9)
    lengths = (9, 30, 4)
    states = [rows_of_lengths(lm, lengths, np.random.default_rng(1)) for _ in range(2)]
    first, second, third = (rng.integers(0, 257, size=(3, 1)) for _ in range(3))
    logits = []
    for state, kernel in zip(states, ("batch", "decode")):
        _, state = lm.forward(first, state, kernel=kernel)
        state.cache["row_lengths"] -= 1
        _, state = lm.forward(second, state, kernel="decode")
        logits.append(lm.forward(third, state, kernel=kernel)[0])
    assert np.abs(logits[0] - logits[1]).max() / np.abs(logits[1]).max() < BATCH_KERNEL_RTOL


def test_openvino_batch_steps_are_refused_where_the_attention_is_not_paged(openvino_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "paged_attention_graph", lambda model: None)  # as for windowed or partial-rotary attention
    cfg = BuildConfig(prefill_runtime="openvino", batch_kernel="openvino_paged", batch_kernel_min_rows=3, max_sequence_length=64)
    with pytest.raises(StageFailed, match="openvino_paged needs this engine's attention as OpenVINO's PagedAttention; its prompts run on "
                                          "the ONNX frontend's graph .*allowed for it: none, int8_gemm"):
        OnnxRuntime("onnxruntime-cpu").build(openvino_engine.exported, tmp_path, cfg, lambda _m: None)


def test_the_scheduler_decodes_many_rows_on_openvino(openvino_engine, tiny_run, monkeypatch):
    """Served steps of 3+ rows reach OpenVINO; every request gets its answer."""
    from tokenizers import Tokenizer

    from pipeline.engine import Limits, Scheduler, parse_request

    lm = openvino_engine.lm
    monkeypatch.setattr(lm.openvino, "request", CountingRequest(lm.openvino.request))
    tokenizer = Tokenizer.from_file(str(tiny_run["paths"]["build"] / "tokenizer.json"))
    limits = Limits(context_limit=256, max_tokens_cap=16, default_max_tokens=8)
    requests = [parse_request(f"request {i}: " + "ab" * (20 * i), {"max_tokens": 8}, tokenizer, limits) for i in range(4)]
    texts = {}
    together = Scheduler(lm, tokenizer, set(), slots=4)
    together.admit_many([(r, lambda delta, finish, i=i: texts.__setitem__(i, texts.get(i, "") + delta)) for i, r in enumerate(requests)])
    while together.active:
        together.step()
    assert lm.openvino.request.calls >= 5 and all(texts.get(i) for i in range(4))


def test_an_openvino_engine_without_openvino_is_refused_with_the_reason(openvino_engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingRuntime, match="build.prefill_runtime: onnxruntime to run without it"):
        OnnxRuntime("onnxruntime-cpu").load(openvino_engine.path, openvino_engine.meta)
    assert runtime_libraries(openvino_engine.meta["session_options"])[-1] == "openvino"
    assert "openvino" not in runtime_libraries({"graph": "fused"})


@pytest.fixture(scope="module")
def batch_engine(tiny_run, tmp_path_factory):
    """The int8-activation fused engine with its batch graph for decode steps of 3+ rows
    (`build.batch_kernel: int8_gemm`)."""
    exported = OnnxModel(path=tiny_run["paths"]["export"], meta=read_manifest(tiny_run["paths"]["export"])["meta"])
    out = tmp_path_factory.mktemp("batch")
    cfg = BuildConfig(int4_compute="int8", batch_kernel="int8_gemm", batch_kernel_min_rows=3, max_sequence_length=64)
    meta = OnnxRuntime("onnxruntime-cpu").build(exported, out, cfg, lambda _m: None)
    return SimpleNamespace(path=out, meta=meta, lm=OnnxRuntime("onnxruntime-cpu").load(out, meta), exported=exported, cfg=cfg)


class CountingSession:
    """An ONNX Runtime session that counts its runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run_with_iobinding(self, binding):
        self.runs += 1
        return self.session.run_with_iobinding(binding)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_batch_graph_decodes_many_rows_near_the_engines_kernel(batch_engine):
    check = batch_engine.meta["batch_kernel_check"]
    assert check["rows"] == BATCH_CHECK_ROWS and check["max_rel_logit_diff"] <= check["decode_kernel_max_rel_logit_diff"] + BATCH_KERNEL_RTOL
    assert check["max_rel_logit_diff"] > 0  # int8 weights: not the exact math
    options = batch_engine.meta["session_options"]
    assert (options["batch_model_file"], options["batch_min_rows"]) == ("batch.onnx", 3)
    counts = op_counts(batch_engine.path / "batch.onnx")
    assert "MatMulNBits" not in counts and counts["DynamicQuantizeMatMul"] == 2 * op_counts(batch_engine.path / "engine.onnx")["MatMulNBits"]
    lm = batch_engine.lm
    lm.batch_session = CountingSession(lm.batch_session)
    rng = np.random.default_rng(5)
    for rows, on_batch in ((2, False), (3, True), (5, True)):
        prompt = rng.integers(0, 257, size=(rows, 12))
        _, state = lm.forward(prompt, None)
        _, kernel_state = lm.forward(prompt, None)
        token = rng.integers(0, 257, size=(rows, 1))
        runs = lm.batch_session.runs
        logits, state = lm.forward(token, state)
        kernel_logits, kernel_state = lm.forward(token, kernel_state, kernel="decode")
        assert lm.batch_session.runs - runs == int(on_batch)
        if on_batch:  # another kernel's rounding, and its keys and values written in place
            assert not np.array_equal(logits, kernel_logits)
            assert np.abs(logits - kernel_logits).max() / np.abs(kernel_logits).max() < BATCH_KERNEL_RTOL
            np.testing.assert_allclose(lm.read_positions(state, rows - 1, 0, 13), lm.read_positions(kernel_state, rows - 1, 0, 13),
                                       rtol=0.05, atol=0.05)
        else:
            np.testing.assert_array_equal(logits, kernel_logits)


def test_a_row_view_binds_only_the_kernels_it_runs(batch_engine):
    """Sessions are bound to a view's KV arrays on first use: a one-row view that decodes binds the
    decode session only; a view of 3+ rows binds the batch session when it steps."""
    lm = batch_engine.lm
    state = lm.empty_state(4)
    one = lm.row_view(state, 0, 1)
    lm.forward(np.asarray([[5]], dtype=np.int64), one)
    assert set(one.cache["bindings"].made) == {"decode"} and "batch" in one.cache["bindings"]
    wide = lm.row_view(state, 0, 4)
    lm.forward(np.full((4, 1), 5, dtype=np.int64), wide)
    assert set(wide.cache["bindings"].made) == {"batch"}


def test_the_batch_check_fails_when_the_int8_weights_are_wrong(batch_engine, tmp_path, monkeypatch):
    from pipeline.modeling import batch_graph

    original = batch_graph.per_channel_int8
    monkeypatch.setattr(batch_graph, "per_channel_int8", lambda weight: (lambda codes, scales: (codes, scales * 1.5))(*original(weight)))
    with pytest.raises(StageFailed, match="the batch kernel's decode steps do not give the engine's logits"):
        OnnxRuntime("onnxruntime-cpu").build(batch_engine.exported, tmp_path, batch_engine.cfg, lambda _m: None)


def test_the_scheduler_decodes_many_rows_on_the_batch_graph(batch_engine, tiny_run):
    """Served steps reach the batch graph: with 3+ rows decoding, the scheduler's steps run there;
    a request alone decodes on the engine's kernel, its solo greedy output."""
    from tokenizers import Tokenizer

    from pipeline.engine import Limits, Scheduler, parse_request

    lm = batch_engine.lm
    lm.batch_session = CountingSession(getattr(lm.batch_session, "session", lm.batch_session))
    tokenizer = Tokenizer.from_file(str(tiny_run["paths"]["build"] / "tokenizer.json"))
    limits = Limits(context_limit=64, max_tokens_cap=16, default_max_tokens=8)
    requests = [parse_request(f"request {i}: " + "ab" * i, {"max_tokens": 8}, tokenizer, limits) for i in range(4)]
    texts = {}

    def sink(i):
        return lambda delta, finish: texts.__setitem__(i, texts.get(i, "") + delta)

    alone = Scheduler(lm, tokenizer, set(), slots=4)
    alone.admit(requests[0], sink("alone"))
    while alone.active:
        alone.step()
    assert lm.batch_session.runs == 0
    expected, _, _ = greedy_decode(lm, np.asarray(requests[0].prompt_ids, dtype=np.int64), 8, lambda: 0.0)
    assert texts["alone"] == tokenizer.decode(expected, skip_special_tokens=True)
    together = Scheduler(lm, tokenizer, set(), slots=4)
    together.admit_many([(r, sink(i)) for i, r in enumerate(requests)])
    while together.active:
        together.step()
    assert lm.batch_session.runs >= 5 and all(texts.get(i) for i in range(4))


@pytest.mark.parametrize("bits, message", [(None, "this engine has none"), (8, "cannot rewrite this engine: .*8-bit MatMulNBits")])
def test_an_engine_the_batch_graph_cannot_rewrite_is_refused_naming_the_setting(tmp_path, bits, message):
    """No int4 matmul to rewrite (nothing quantized), or a MatMulNBits form it does not handle."""
    from onnx import TensorProto, helper

    if bits is None:
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
    else:
        node = helper.make_node("MatMulNBits", ["X", "W", "S"], ["Y"], domain="com.microsoft", K=32, N=4, bits=bits, block_size=32)
    graph = helper.make_graph([node], "engine", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor("W", TensorProto.FLOAT, [32, 4], [0.0] * 128), helper.make_tensor("S", TensorProto.FLOAT, [4], [1.0] * 4)])
    onnx.save(helper.make_model(graph), str(tmp_path / "engine.onnx"))
    cfg = BuildConfig(batch_kernel="int8_gemm")
    with pytest.raises(StageFailed, match=f"build.batch_kernel: int8_gemm .*{message}"):
        OnnxRuntime.build_batch_kernel(tmp_path, {}, cfg, lambda _m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.onnx"]  # nothing half-written left beside it
