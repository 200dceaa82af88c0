"""One `forward(input_ids, state) -> (logits, state)` for an ONNX Runtime session, a TensorRT engine
and a PyTorch model, so perplexity, agreement and latency are computed by the same code for source
and engine, and the server drives every target through the same decode loop.

This module needs only numpy (onnxruntime, tensorrt and torch are imported where used): the Triton
package copies it unchanged into the model repository, whose runtime environment has no Kiln."""

from __future__ import annotations

import itertools
import mmap
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class MissingRuntime(RuntimeError):
    """What an engine's target needs is not here (onnxruntime-gpu, tensorrt, torch with CUDA, a GPU)."""


class SequenceTooLong(ValueError):
    """A prompt plus generated tokens would not fit the engine's KV buffers."""


@dataclass
class DecodeState:
    """KV cache of one sequence batch plus how many positions it holds."""

    cache: Any
    length: int


class CausalLM(Protocol):
    def forward(self, input_ids: np.ndarray, state: DecodeState | None) -> tuple[np.ndarray, DecodeState]: ...


def positions_and_mask(batch: int, past: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    total = past + seq
    mask = np.ones((batch, total), dtype=np.int64)
    positions = np.broadcast_to(np.arange(past, total, dtype=np.int64), (batch, seq)).copy()
    return positions, mask


class OrtCausalLM:
    """Drives an exported/built Kiln ONNX graph (the portable graph of `decoder_graph`)."""

    def __init__(self, session):
        self.session = session
        past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        # fp16 graphs (modeling/tensorrt_graph) keep their KV cache in fp16
        self.kv_dtype = np.float16 if past[0].type == "tensor(float16)" else np.float32

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [empty] * len(self.past_names)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = ["logits", *self.present_names]
        return dict(zip(outputs, self.session.run(outputs, feeds)))

    def forward(self, input_ids: np.ndarray, state: DecodeState | None) -> tuple[np.ndarray, DecodeState]:
        batch, seq = input_ids.shape
        past_len = state.length if state else 0
        cache = state.cache if state else self.empty_cache(batch)
        positions, mask = positions_and_mask(batch, past_len, seq)
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": mask, "position_ids": positions}
        feeds.update(zip(self.past_names, cache))
        out = self.run(feeds)
        return out["logits"], DecodeState([out[n] for n in self.present_names], past_len + seq)

    def truncate(self, state: DecodeState, length: int) -> DecodeState:
        """The state's first `length` positions (speculative decoding's rollback: a rejected draft's
        keys and values dropped; the slices are views, nothing is copied)."""
        return DecodeState([array[:, :, :length] for array in state.cache], length)


def page_backed_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A zero array in anonymous memory of its own, so `release_pages` can hand parts of it back to
    the operating system: memory is taken page by page as positions are written (as np.zeros
    does) and, unlike np.zeros, given back when a row is done."""
    count = int(np.prod(shape))
    size = max(count * np.dtype(dtype).itemsize, 1)
    if hasattr(mmap, "MAP_ANONYMOUS"):  # private: a shared mapping's released pages would stay in shmem
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:
        buffer = mmap.mmap(-1, size)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


def release_pages(array: np.ndarray, start: int, stop: int) -> None:
    """Return the whole pages inside bytes [start, stop) of a `page_backed_zeros` array to the OS;
    they read as zeros afterwards. A no-op where madvise is not available."""
    buffer = array.base
    while isinstance(buffer, np.ndarray):
        buffer = buffer.base
    if isinstance(buffer, memoryview):  # np.frombuffer keeps a memoryview of the mmap
        buffer = buffer.obj
    if not isinstance(buffer, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, stop // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        buffer.madvise(mmap.MADV_DONTNEED, first, last - first)


class KvBindings:
    """The IO bindings of one set of KV arrays, one per session of the engine, each made the first
    time its kernel runs: the scheduler keeps a row view per row range it meets, and most of them
    only ever run one kernel (a one-row view: prompt chunks; a wide one: decode steps), so binding
    every session up front (0.44 ms a view with three sessions, measured) was mostly waste."""

    def __init__(self, lm: "FusedOrtCausalLM", arrays: list[np.ndarray]):
        self.lm, self.arrays, self.made = lm, arrays, {}

    def __contains__(self, kind: str) -> bool:
        return kind in self.lm.sessions()

    def __getitem__(self, kind: str):
        if kind not in self.made:
            self.made[kind] = self.lm.bind(kind, self.arrays)
        return self.made[kind]


class FusedOrtCausalLM:
    """Drives the ONNX Runtime-specific fused graph (`decoder_graph.FusedOps`): each sequence batch gets
    KV buffers of `max_sequence_length` positions, bound with IO binding as both past and present
    of every layer, so a decode step copies nothing but the new token's keys and values (written in
    place by GroupQueryAttention) and the logits. Rows of a batch may have different lengths.

    `prefill_session`: the same graph with another matmul kernel for prompts (an int8-activation
    engine's prompts run with fp32 activations: at 512 tokens ONNX Runtime's int8 MatMulNBits is
    slower than its fp32 one, measured in docs/results.md). It shares the KV buffers.
    `openvino`: prompt chunks of one row run on OpenVINO instead (`openvino_engine`), and with
    `openvino_batch` so do decode steps of at least `batch_min_rows` rows (`OpenVinoPaged`).
    `batch_session`: the batch graph (`batch_graph`, int8 GEMMs) for decode steps of at least
    `batch_min_rows` rows, where it is faster than the engine's kernel. It shares the KV buffers too."""

    def __init__(self, session, max_sequence_length: int, prefill_session=None, openvino: "OpenVinoPaged | OpenVinoPrefill | None" = None,
                 batch_session=None, batch_min_rows: int = 0, openvino_batch: bool = False):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.prefill_session = prefill_session
        self.openvino = openvino
        self.openvino_batch = openvino_batch
        self.batch_session = batch_session
        self.batch_min_rows = batch_min_rows
        self.max_sequence_length = max_sequence_length
        past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.vocab = session.get_outputs()[0].shape[2]
        # engines built before logits_index existed compute logits at every position
        self.selects_logits = any(i.name == "logits_index" for i in session.get_inputs())

    def without_prefill(self) -> "FusedOrtCausalLM":
        """The engine with its decode kernel for every call (what validate scores: the kernel that
        produces generated tokens)."""
        return FusedOrtCausalLM(self.session, self.max_sequence_length)

    def sessions(self) -> dict:
        """The engine's ONNX Runtime sessions by kernel name (`forward`'s `kernel`)."""
        sessions = {"decode": self.session, "prefill": self.prefill_session, "batch": self.batch_session}
        return {kind: session for kind, session in sessions.items() if session is not None}

    def bind(self, kind: str, arrays: list[np.ndarray]):
        """An IO binding of session `kind` over the KV arrays (on CPU an OrtValue wraps the array's
        memory, so every session reads and writes the live cache)."""
        binding = self.sessions()[kind].io_binding()
        binding.bind_output("logits", "cpu")  # bound first: output 0 of every run
        for past, present, array in zip(self.past_names, self.present_names, arrays):
            value = self._ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def new_cache(self, batch: int):
        """Fresh buffers per sequence batch, so two live states never share memory. Pages are taken
        lazily: only the positions a sequence reaches are ever touched (`release_rows` gives a
        finished row's back)."""
        arrays = [page_backed_zeros((batch, self.kv_heads, self.max_sequence_length, self.head_dim)) for _ in self.past_names]
        return {"bindings": KvBindings(self, arrays), "arrays": arrays, "origin": (next(_BUFFER_IDS), 0, batch),
                "step_logits": np.empty((batch, 1, self.vocab), dtype=np.float32), "row_lengths": np.zeros(batch, dtype=np.int32)}

    def empty_state(self, batch: int) -> DecodeState:
        """A batch of `batch` free rows for in-flight batching (`kiln_engine.Scheduler`)."""
        return DecodeState(self.new_cache(batch), 0)

    def row_view(self, state: DecodeState, start: int, rows: int) -> DecodeState:
        """A state over rows [start, start + rows) of a batch state, sharing its keys and values (batch
        is the outermost dimension, so the view is contiguous): a step over a few rows costs a few
        rows, not the whole batch. Its `row_lengths` is a copy; the caller writes it back."""
        arrays = [array[start:start + rows] for array in state.cache["arrays"]]
        buffers, first, total = state.cache["origin"]
        return DecodeState({"bindings": KvBindings(self, arrays), "arrays": arrays, "origin": (buffers, first + start, total),
                            "step_logits": np.empty((rows, 1, self.vocab), dtype=np.float32),
                            "row_lengths": state.cache["row_lengths"][start:start + rows].copy()}, state.length)

    def release_rows(self, state: DecodeState, rows) -> None:
        """Give the memory of these rows' keys and values back (their requests are done)."""
        for array in state.cache["arrays"]:
            row_bytes = array[0].nbytes
            for row in rows:
                release_pages(array, row * row_bytes, (row + 1) * row_bytes)
        state.cache["row_lengths"][list(rows)] = 0
        for row in rows:
            self._forget(state, row, 0)

    def _forget(self, state: DecodeState, row: int, start: int) -> None:
        """Positions from `start` of the row changed outside OpenVINO: the mirror of its past that
        OpenVINO's paged graph keeps (`OpenVinoPaged`) must not be reused from there."""
        if self.openvino is not None:
            buffers, first, _ = state.cache["origin"]
            self.openvino.forget((buffers, first + row), start)

    def read_positions(self, state: DecodeState, row: int, start: int, stop: int) -> np.ndarray:
        """Keys and values of positions [start, stop) of one row: [layers × (key, value), kv_heads, positions, head_dim]."""
        return np.stack([array[row, :, start:stop] for array in state.cache["arrays"]])

    def write_positions(self, state: DecodeState, row: int, start: int, kv: np.ndarray) -> None:
        """Put `read_positions`' keys and values at positions [start, start + n) of one row."""
        for array, block in zip(state.cache["arrays"], kv):
            array[row, :, start:start + block.shape[1]] = block
        self._forget(state, row, start)

    def _on_openvino(self, input_ids: np.ndarray, cache: dict, pasts: np.ndarray, lengths, kernel: str, last_only: bool) -> np.ndarray | None:
        """The call's logits where OpenVINO runs it (a prompt chunk of 32+ tokens of one row; a decode
        step of many rows with `openvino_batch`); None where ONNX Runtime does, which then writes
        each row's positions from its past on (what OpenVINO's mirror must not reuse)."""
        batch, seq = input_ids.shape
        if lengths is None and kernel == "prefill" and batch == 1 and seq >= OPENVINO_MIN_TOKENS:
            return self.openvino.run(input_ids, cache["arrays"], int(pasts[0]), last_only, row=cache["origin"])
        if lengths is None and kernel == "batch" and self.openvino_batch and seq == 1:
            return self.openvino.run_rows(cache["arrays"], cache["origin"], list(input_ids), pasts.tolist())
        self.openvino.written(cache["origin"], pasts)
        return None

    def forward(self, input_ids: np.ndarray, state: DecodeState | None, lengths: np.ndarray | None = None, *,
                last_only: bool = False, kernel: str | None = None) -> tuple[np.ndarray, DecodeState]:
        """`lengths`: valid tokens per row of `input_ids` for rows of different lengths (right-padded;
        row b's next-token logits are at position lengths[b] - 1). Rows keep their own positions:
        GroupQueryAttention reads and writes each row's cache up to its own length. `last_only`:
        logits [batch, 1, vocab] at each row's last valid position. `kernel`: "prefill" or "decode"
        (default: prefill for more than one token, where the engine has a prefill session)."""
        batch, seq = input_ids.shape
        new = np.full(batch, seq, dtype=np.int32) if lengths is None else np.asarray(lengths, dtype=np.int32)
        totals = (state.cache["row_lengths"] if state else np.zeros(batch, dtype=np.int32)) + new
        total = int(totals.max())
        if total > self.max_sequence_length:
            raise SequenceTooLong(f"sequence of {total} tokens exceeds the engine's max_sequence_length {self.max_sequence_length} "
                            "(set build.max_sequence_length in the recipe and rebuild)")
        cache = dict(state.cache) if state else self.new_cache(batch)
        batched = (self.batch_session is not None or self.openvino_batch) and batch >= self.batch_min_rows
        kernel = kernel or ("prefill" if seq > 1 else "batch" if batched else "decode")
        if self.openvino is not None:
            logits = self._on_openvino(input_ids, cache, totals - new, lengths, kernel, last_only)
            if logits is not None:
                cache["row_lengths"] = totals
                return logits, DecodeState(cache, total)
            if kernel == "prefill":  # a chunk too short for OpenVINO: the decode kernel
                kernel = "decode"
        if kernel not in cache["bindings"]:  # no prefill (or batch) session: the engine's kernel runs it
            kernel = "decode"
        binding, session = cache["bindings"][kernel], self.sessions()[kernel]
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", totals - 1)
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        last = np.maximum(new - 1, 0).astype(np.int64)[:, None]
        if self.selects_logits:
            binding.bind_cpu_input("logits_index", last if last_only else np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy())
        if seq == 1 or (last_only and self.selects_logits):  # one position per row: logits land in one preallocated buffer
            logits = cache["step_logits"]
            binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            session.run_with_iobinding(binding)
            logits = logits.copy()
        else:
            binding.bind_output("logits", "cpu")
            session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy()
            if last_only:
                logits = np.take_along_axis(logits, last[:, :, None], axis=1)
        cache["row_lengths"] = totals
        return logits, DecodeState(cache, total)


# Names of KV buffer sets (`FusedOrtCausalLM.new_cache`): a row of the process's buffers is (set, row)
_BUFFER_IDS = itertools.count()

# Prompt chunks shorter than this run on the decode session: below it OpenVINO's per-call cost
# eats its faster matmuls (measured: 16 tokens after a past of 500, 61 ms vs 37 ms).
OPENVINO_MIN_TOKENS = 32


def openvino_engine(model_file, threads: int, max_sequence_length: int) -> "OpenVinoPaged | OpenVinoPrefill":
    """OpenVINO's CPU plugin on the engine's own graph file, for prompt chunks (and decode steps of
    many rows, `OpenVinoPaged.run_rows`): its
    GroupQueryAttention nodes replaced by OpenVINO's PagedAttention where `paged_attention_graph`
    covers them (faster: docs/results.md), the graph as the ONNX frontend reads it otherwise."""
    try:
        import openvino as ov
    except ImportError as e:
        raise MissingRuntime(f"this engine runs prompts on OpenVINO (build.prefill_runtime: openvino) and needs the openvino "
                             f"package ({e}); rebuild with build.prefill_runtime: onnxruntime to run without it") from None
    model = ov.Core().read_model(str(model_file))
    past_names = [p.get_any_name() for p in model.inputs if p.get_any_name().startswith("past_key_values.")]
    try:
        layers = paged_attention_graph(model)
    except (ImportError, RuntimeError) as e:  # PagedAttention is OpenVINO's internal op: another release may change it
        plain = OpenVinoPrefill(ov.Core().read_model(str(model_file)), threads)
        plain.attention = f"the ONNX frontend's graph (PagedAttention rewrite failed on OpenVINO {plain.version}: {e})"
        return plain
    if layers is None:
        return OpenVinoPrefill(model, threads)
    return OpenVinoPaged(model, layers, past_names, threads, max_sequence_length)


def paged_attention_graph(model) -> list[tuple[str, str]] | None:
    """Rewrite an OpenVINO model of the fused graph in place: each GroupQueryAttention becomes
    rotary embedding + OpenVINO's PagedAttention over a block cache (inputs `key_cache.i`,
    `value_cache.i`, in OpenVINO's layout and precision), and the layer's rotated keys and values
    of the chunk become outputs (`chunk.i.key`, `chunk.i.value`, [1, kv_heads, tokens, head_dim]) in
    place of the whole present. Returns each layer's (past key, past value) input names, in cache
    order; None, model untouched, where an attention node has what the rewrite does not cover
    (windowed or quantized KV, interleaved or partial rotary, extra inputs)."""
    import openvino as ov
    from openvino import opset13 as ops
    from openvino._pyopenvino.op import _PagedAttentionExtension

    nodes = [n for n in model.get_ordered_ops() if n.get_type_name() == "GroupQueryAttention"]
    if not nodes:
        return None
    for node in nodes:
        a = node.get_attributes()
        plain = (a.get("local_window_size", -1) == -1 and not a.get("sliding_window_cache") and not a.get("smooth_softmax")
                 and not a.get("rotary_interleaved") and a.get("k_quant_type", "NONE") == "NONE" and a.get("v_quant_type", "NONE") == "NONE"
                 and all(list(node.input_value(i).get_partial_shape()) == [0] for i in range(9, node.get_input_size())))
        head_dim = node.input_value(0).get_partial_shape()[3]
        if a.get("do_rotary"):
            plain = plain and head_dim.is_static and node.input_value(7).get_partial_shape()[1] == head_dim.get_length() // 2
        if not plain:
            return None

    def parameter(shape, element_type, name):
        p = ops.parameter(shape, element_type, name=name)
        p.output(0).get_tensor().set_names({name})
        return p

    def const(value, dtype):
        return ops.constant(np.array(value, dtype=dtype))

    i32 = ov.Type.i32
    positions = parameter([-1], ov.Type.i64, "position_ids")
    past_lens, begins, blocks, block_begins = (parameter([-1], i32, n) for n in
                                               ("past_lens", "subsequence_begins", "block_indices", "block_indices_begins"))
    max_context = parameter([], i32, "max_context_len")
    added, layers, stale = [positions, past_lens, begins, blocks, block_begins, max_context], [], set()
    empty_i32, empty_f32 = const(np.zeros(0), np.int32), const(np.zeros(0), np.float32)
    for i, node in enumerate(nodes):
        a = node.get_attributes()
        heads, kv_heads, head_dim = a["num_heads"], a["kv_num_heads"], node.input_value(0).get_partial_shape()[3].get_length()
        q, k, v = (node.input_value(j) for j in range(3))  # [1, heads, tokens, head_dim]
        if a["do_rotary"]:  # rotate-half RoPE at each token's position, as GroupQueryAttention applies it
            cos, sin = (ops.gather(node.input_value(j), positions, const(0, np.int64)) for j in (7, 8))
            cos, sin = ops.concat([cos, cos], 1), ops.concat([sin, sin], 1)

            def rotary(x, cos=cos, sin=sin):
                first, second = ops.split(x, const(3, np.int64), 2).outputs()
                return ops.add(ops.multiply(x, cos), ops.multiply(ops.concat([ops.negative(second), first], 3), sin))

            q, k = rotary(q), rotary(k)

        def tokens(x, width):  # [1, h, tokens, d] -> [tokens, h * d]
            return ops.reshape(ops.transpose(x, const([0, 2, 1, 3], np.int64)), const([-1, width], np.int64), False)

        chunk_k, chunk_v = k, v  # [1, kv_heads, tokens, head_dim]: the layout of the row's buffers
        q, k, v = tokens(q, heads * head_dim), tokens(k, kv_heads * head_dim), tokens(v, kv_heads * head_dim)
        key_cache = parameter(ov.PartialShape.dynamic(4), ov.Type.dynamic, f"key_cache.{i}")
        value_cache = parameter(ov.PartialShape.dynamic(4), ov.Type.dynamic, f"value_cache.{i}")
        added += [key_cache, value_cache]
        # PagedAttention's 28 inputs (OpenVINO 2026.4): past the 13 that matter here, the unused
        # options (score aggregation, cache rotation, xattention, sinks, adaptive RKV, token types,
        # tree masks) off, as OpenVINO's own SDPA-to-PagedAttention pass leaves them
        inputs = [q, k, v, key_cache, value_cache, past_lens, begins, blocks, block_begins, const(a["scale"] or head_dim ** -0.5, np.float32),
                  const(0, np.int32), empty_f32, max_context, empty_i32, empty_i32, empty_i32, empty_f32, empty_f32,
                  const(0, np.int32), const(0, np.int32), const(np.zeros((0, 0, 0, 0)), np.float32), const(0, np.int32),
                  empty_i32, empty_i32, empty_i32, empty_i32, const(np.zeros(0), np.uint8), empty_i32]
        attention = _PagedAttentionExtension([x if isinstance(x, ov.Output) else x.output(0) for x in inputs])
        info = attention.get_rt_info()  # the CPU plugin sizes the caches from these
        info["num_k_heads"], info["k_head_size"], info["num_v_heads"], info["v_head_size"] = kv_heads, head_dim, kv_heads, head_dim
        out = ops.reshape(attention.output(0), const([1, -1, heads * head_dim], np.int64), False)
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(out.output(0))
        for j in (1, 2):
            for target in list(node.output(j).get_target_inputs()):
                model.remove_result(target.get_node())
        for name, tensor in ((f"chunk.{i}.key", chunk_k), (f"chunk.{i}.value", chunk_v)):
            result = ops.result(tensor)
            result.output(0).get_tensor().set_names({name})
            model.add_results([result])
        names = tuple(node.input_value(j).get_node().get_friendly_name() for j in (3, 4))
        layers.append(names)
        stale.update(names)
    for p in list(model.get_parameters()):
        if p.get_friendly_name() in stale or p.get_friendly_name() in ("seqlens_k", "total_sequence_length"):
            model.remove_parameter(p)
    model.add_parameters(added)
    model.validate_nodes_and_infer_types()
    return layers


class OpenVinoPaged:
    """The engine's graph rewritten for OpenVINO's PagedAttention (`paged_attention_graph`), running
    prompt chunks of one row and, for an engine built with `batch_kernel: openvino_paged`, decode
    steps of many rows in one call. Its fused attention kernel replaces the generic subgraph the
    ONNX frontend makes of GroupQueryAttention (a 512-token prompt ~1.1-1.3x faster, 2,040 tokens
    ~1.4x), and its matmuls at 32 rows beat ONNX Runtime's int8 kernel (docs/results.md).

    ONNX Runtime's buffers stay the keys and values of record; PagedAttention reads a mirror of
    them in blocks of its own, in OpenVINO's inference precision (bf16 where the CPU has it), one
    block range per row of one buffer set. `held[row]`: how many of the row's first positions the
    mirror holds. A call copies in what it lacks (after decode steps on ONNX Runtime: their few new
    positions), and the keys and values it computes come out as outputs, copied into the row's
    buffers, where the decode kernel reads them. Whoever changes a row's positions otherwise says
    so (`forget`)."""

    def __init__(self, model, layers: list[tuple[str, str]], past_names: list[str], threads: int, max_sequence_length: int):
        import openvino as ov

        self._ov = ov
        core = ov.Core()
        self.version = ov.get_version()
        precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
        # the cache in the inference precision itself: bf16 halves what attention reads (u8, the
        # CPU plugin's default, quantizes keys per block: no faster here, measured)
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads), "KV_CACHE_PRECISION": precision})
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.attention = "PagedAttention"
        self.request = compiled.create_infer_request()
        self.layers, self.past_names = layers, past_names  # past_names: the order of the callers' arrays
        cache_input = compiled.input("key_cache.0")
        self.cache_type = cache_input.get_element_type()
        self.kv_heads, self.block, self.head_dim = (d.get_length() for d in list(cache_input.get_partial_shape())[1:])
        self.row_blocks = -(-max_sequence_length // self.block)
        self.converter = None
        if self.cache_type != ov.Type.f32:  # rounds fp32 keys and values to the cache's type (numpy has no bf16)
            source = ov.opset13.parameter([-1], ov.Type.f32)
            self.converter = core.compile_model(ov.Model([ov.opset13.convert(source, self.cache_type)], [source]), "CPU").create_infer_request()
        self.buffers, self.caches, self.held = None, [], np.zeros(0, dtype=np.int64)

    def _mirror(self, buffers: int, rows: int) -> None:
        """Blocks for `rows` rows of buffer set `buffers`; another set's mirror is dropped."""
        if buffers == self.buffers and rows <= len(self.held):
            return
        self.buffers, self.held, self.caches = buffers, np.zeros(rows, dtype=np.int64), []
        dtype = np.float32 if self.cache_type == self._ov.Type.f32 else np.uint16
        shape = [rows * self.row_blocks, self.kv_heads, self.block, self.head_dim]
        for i, (key, value) in enumerate(self.layers):
            for name, past in ((f"key_cache.{i}", key), (f"value_cache.{i}", value)):
                array = page_backed_zeros(tuple(shape), dtype)  # pages taken as positions are written
                self.request.set_tensor(name, self._ov.Tensor(array, shape, self.cache_type))
                self.caches.append((past, array))

    def forget(self, row: tuple[int, int], start: int = 0) -> None:
        """Positions from `start` of buffer row `row` ((set, row)) changed: the mirror no longer
        holds them (from 0: the row is free, and its blocks' memory goes back)."""
        buffers, index = row
        if buffers != self.buffers or index >= len(self.held) or self.held[index] <= start:
            return
        self.held[index] = start
        if start == 0:
            for _, cache in self.caches:
                release_pages(cache, index * cache[0].nbytes * self.row_blocks, (index + 1) * cache[0].nbytes * self.row_blocks)

    def written(self, origin: tuple[int, int, int], starts: np.ndarray) -> None:
        """ONNX Runtime wrote row i of the view at `origin` from position starts[i] on."""
        buffers, first, _ = origin
        if buffers == self.buffers:
            held = self.held[first:first + len(starts)]
            np.minimum(held, starts[:len(held)], out=held)

    def _copy_in(self, by_name: dict[str, np.ndarray], view_row: int, row: int, start: int, stop: int) -> None:
        """Positions [start, stop) of the view's row into buffer row `row`'s blocks."""
        values = np.stack([by_name[past][view_row, :, start:stop] for past, _ in self.caches])  # [arrays, kv, n, dim]
        if self.converter is not None:
            self.converter.infer([values.reshape(-1)])
            values = self.converter.get_output_tensor(0).data.view(np.uint16).reshape(values.shape)
        for (_, cache), row_values in zip(self.caches, values):
            position = start
            while position < stop:
                block, offset = divmod(position, self.block)
                take = min(self.block - offset, stop - position)
                cache[row * self.row_blocks + block, :, offset:offset + take] = row_values[:, position - start:position - start + take]
                position += take

    def run_rows(self, arrays: list[np.ndarray], origin: tuple[int, int, int], tokens: list[np.ndarray], pasts: list[int],
                 every_position: bool = False) -> np.ndarray:
        """Row i of the view over `arrays` (buffer rows origin[1] + i of set origin[0], which has
        origin[2] rows) takes `tokens[i]` after its first `pasts[i]` positions, all in one call.
        Returns logits [rows, 1, vocab] at each row's last token, or [1, tokens, vocab] at every
        position of a single row (`every_position`)."""
        buffers, first, rows = origin
        self._mirror(buffers, rows)
        by_name = dict(zip(self.past_names, arrays))
        begins, blocks, block_begins, positions = [0], [], [0], []
        for i, (ids, past) in enumerate(zip(tokens, pasts)):
            row = first + i
            held = min(int(self.held[row]), past)
            if held < past:
                self._copy_in(by_name, i, row, held, past)
            self.held[row] = 0  # until this call has written the row's new positions
            begins.append(begins[-1] + len(ids))
            blocks.extend(range(row * self.row_blocks, row * self.row_blocks + -(-(past + len(ids)) // self.block)))
            block_begins.append(len(blocks))
            positions.append(np.arange(past, past + len(ids), dtype=np.int64))
        last = np.array(begins[1:], dtype=np.int64) - 1
        feeds = {"input_ids": np.concatenate(tokens).astype(np.int64)[None], "position_ids": np.concatenate(positions),
                 "past_lens": np.array(pasts, dtype=np.int32), "subsequence_begins": np.array(begins, dtype=np.int32),
                 "block_indices": np.array(blocks, dtype=np.int32), "block_indices_begins": np.array(block_begins, dtype=np.int32),
                 "max_context_len": np.array(max(p + len(t) for p, t in zip(pasts, tokens)), dtype=np.int32),
                 "logits_index": (np.arange(begins[-1], dtype=np.int64) if every_position else last)[None]}
        outputs = self.request.infer(feeds, share_inputs=True, share_outputs=True)
        rows_written = np.arange(len(tokens))
        one_each = begins[-1] == len(tokens)  # a decode step: one assignment per array for all rows
        for j, (key, value) in enumerate(self.layers):
            for past_name, kind in ((key, "key"), (value, "value")):
                chunk, array = outputs[f"chunk.{j}.{kind}"][0], by_name[past_name]  # chunk: [kv, tokens, dim]
                if one_each:
                    array[rows_written, :, pasts] = chunk.transpose(1, 0, 2)
                    continue
                for i, past in enumerate(pasts):
                    array[i, :, past:past + begins[i + 1] - begins[i]] = chunk[:, begins[i]:begins[i + 1]]
        self.held[first:first + len(tokens)] = np.asarray(pasts) + np.diff(begins)
        logits = np.array(outputs["logits"], dtype=np.float32)
        return logits if every_position else logits.reshape(len(tokens), 1, -1)

    def run(self, input_ids: np.ndarray, arrays: list[np.ndarray], past: int, last_only: bool, row=None) -> np.ndarray:
        """As `OpenVinoPrefill.run`; `row`: the view's origin (`FusedOrtCausalLM.new_cache`)."""
        origin = row if row is not None else (next(_BUFFER_IDS), 0, 1)  # no name: a mirror of its own
        logits = self.run_rows(arrays, origin, [np.asarray(input_ids[0])], [past], every_position=not last_only)
        return logits if not last_only else logits.reshape(1, 1, -1)


class OpenVinoPrefill:
    """The engine's own graph as OpenVINO's ONNX frontend reads it, for prompt chunks of one row (the
    fallback of `openvino_engine` for attention the paged graph does not cover):
    OpenVINO reads ONNX Runtime's contrib ops (MatMulNBits, GroupQueryAttention) and runs int4
    matmuls with dynamically quantized activations and, where the CPU has AMX/AVX-512-BF16, bf16
    attention (a 512-token prompt ~2.8x faster than ONNX Runtime's fp32 kernel here; docs/results.md). Its
    GroupQueryAttention takes the row's past as a tensor and returns past plus chunk, so the past is
    copied in and only the chunk's keys and values are copied back into the row's buffers."""

    def __init__(self, model, threads: int):
        import openvino as ov

        self.version = ov.get_version()
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads)})
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # bf16 where the CPU has it
        self.attention = "the ONNX frontend's graph (windowed, partial-rotary or interleaved attention)"
        self.request = compiled.create_infer_request()
        self.past_names = [p.get_any_name() for p in compiled.inputs if p.get_any_name().startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]

    def run(self, input_ids: np.ndarray, arrays: list[np.ndarray], past: int, last_only: bool, row=None) -> np.ndarray:
        """Prefill `input_ids` [1, seq] after the first `past` positions of row 0 of `arrays` (one per
        past input, in the graph's order), writing the chunk's keys and values in place."""
        seq = input_ids.shape[1]
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "seqlens_k": np.array([past + seq - 1], dtype=np.int32),
                 "total_sequence_length": np.array(past + seq, dtype=np.int32),
                 "logits_index": np.array([[seq - 1]] if last_only else [np.arange(seq)], dtype=np.int64)}
        for name, array in zip(self.past_names, arrays):
            feeds[name] = np.ascontiguousarray(array[:1, :, :past])
        # shared: OpenVINO reads the arrays in place and returns views of its own output tensors
        # instead of copying both (each view is copied out below, before the next call reuses it):
        # one call after a past of 100-400 positions 1.12-1.28x faster, a 2,040-token prompt in
        # 256-token chunks ~1.05x (docs/results.md). A request never mixes the two modes (OpenVINO
        # then fails to resize the inputs it was given).
        outputs = self.request.infer(feeds, share_inputs=True, share_outputs=True)
        for name, array in zip(self.present_names, arrays):
            array[:1, :, past:past + seq] = outputs[name][:, :, past:past + seq]
        return np.array(outputs["logits"], dtype=np.float32)


    def forget(self, row, start: int = 0) -> None:
        """Nothing is kept between calls."""

    def written(self, origin, starts) -> None:
        """Nothing is kept between calls."""

class TorchCausalLM:
    """A transformers causal LM with its DynamicCache kept as is between steps."""

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids: np.ndarray, state: DecodeState | None) -> tuple[np.ndarray, DecodeState]:
        import torch

        batch, seq = input_ids.shape
        past_len = state.length if state else 0
        positions, mask = positions_and_mask(batch, past_len, seq)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions),
                past_key_values=state.cache if state else None,
                use_cache=True,
            )
        return out.logits.float().numpy(), DecodeState(out.past_key_values, past_len + seq)


# `build.int4_compute` as MatMulNBits' accuracy_level (see make_ort_session)
MATMULNBITS_ACCURACY_LEVEL = {"fp32": 0, "int8": 4}


def make_ort_session(model_path, *, threads: int | None = None, optimization: str = "all",
                     int4_compute: str = "fp32", optimized_output=None, providers=("CPUExecutionProvider",),
                     dequantize_in_order: bool = False, spinning: bool = True):
    """The one place ONNX Runtime session options are chosen; `build` records the same options."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spinning:
        # a second session beside a decode session (the prefill kernel): its idle workers must not
        # spin on the cores the decode steps need (measured: served tokens/s -21 % with spinning)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if dequantize_in_order:
        # Run each DequantizeLinear just before its MatMul. In the default order (and at any
        # optimization level but "disable") ONNX Runtime ran a graph that still dequantizes at run
        # time with every layer's float32 weight alive at once: for the 1B shapes' exported graph
        # 3.9 GB (default order) or 5.2 GB (basic level, priority order) vs 1.6 GB (measured).
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # accuracy_level 0 keeps MatMulNBits in fp32 (the exact dequantized weights); 4 quantizes
    # activations to int8 inside the kernel: faster, ~0.5% relative matmul error (measured).
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(MATMULNBITS_ACCURACY_LEVEL[int4_compute]))
    so.log_severity_level = 3
    if optimized_output is not None:
        so.optimized_model_filepath = str(optimized_output)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized_output.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(model_path), so, providers=list(providers))


def prompt_forward(lm: CausalLM, input_ids: np.ndarray, state: DecodeState | None = None) -> tuple[np.ndarray, DecodeState]:
    """A prompt's forward when only its next token is wanted: engines that can compute logits at
    the last position only (`selects_logits`) do so."""
    if getattr(lm, "selects_logits", False):
        return lm.forward(input_ids, state, last_only=True)
    return lm.forward(input_ids, state)


def greedy_decode(lm: CausalLM, prompt: np.ndarray, new_tokens: int, clock) -> tuple[list[int], float, list[float]]:
    """Greedy generation at batch 1. Returns the tokens, time to first token and each decode step's time."""
    t0 = clock()
    logits, state = prompt_forward(lm, prompt[None, :])
    token = int(logits[0, -1].argmax())
    ttft = clock() - t0
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        t = clock()
        logits, state = lm.forward(np.array([[token]], dtype=np.int64), state)
        token = int(logits[0, -1].argmax())
        steps.append(clock() - t)
        tokens.append(token)
    return tokens, ttft, steps


def load_engine(engine_dir, options: dict, device_id: int = 0, threads: int | None = None):
    """The `CausalLM` for a built engine folder as its target runs it. `options`: what the package
    stage records (`stages/package.engine_options`): `target`, `model_file` and, for ONNX Runtime,
    the session options it was built with. `device_id`: the GPU of a GPU target (for a Triton
    KIND_GPU instance, the one Triton gave it)."""
    from pathlib import Path

    target = options.get("target", "onnxruntime-cpu")
    if target == "tensorrt":
        return load_tensorrt_engine(Path(engine_dir) / options["model_file"], device_id)
    if target == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingRuntime(f"this engine runs on ONNX Runtime's CUDAExecutionProvider; onnxruntime {ort.__version__} here "
                                 f"has only {ort.get_available_providers()}: install onnxruntime-gpu on a host with an NVIDIA GPU")
        options = {**options, "providers": [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]}
    return load_ort_engine(engine_dir, options, threads)


def load_draft_engine(speculative: dict | None, base_dir, threads: int | None = None):
    """The draft model's engine of speculative settings with `method: draft` (None for any other):
    the Kiln engine folder `speculative["draft_engine"]`, relative to `base_dir` (the package's model
    version folder) or absolute, loaded with the session options it was built with. The caller has
    checked the folder against its manifest."""
    import json
    from pathlib import Path

    if not speculative or speculative.get("method") != "draft":
        return None
    folder = Path(base_dir) / speculative["draft_engine"]
    options = json.loads((folder / "session_options.json").read_text())["load"]
    # it takes turns with the target on the same cores: spinning workers of either slow the other
    # (measured, benchmarks/speculative.py: 37.8 -> 45.2 tokens/s with the draft's spinning off)
    return load_ort_engine(folder, options, threads, spinning=False)


def load_tensorrt_engine(plan_file, device_id: int = 0):
    """A serialized TensorRT engine on GPU `device_id`, driven by `TensorRtCausalLM`."""
    from pathlib import Path

    try:
        import tensorrt as trt
        import torch
    except ImportError as e:
        raise MissingRuntime(f"this engine is a TensorRT plan: it needs the tensorrt package and torch with CUDA ({e})") from None
    if not torch.cuda.is_available():
        raise MissingRuntime(f"this engine is a TensorRT plan: torch {torch.__version__} here sees no CUDA device")
    torch.cuda.set_device(device_id)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(plan_file).read_bytes())
    if engine is None:
        raise MissingRuntime(f"TensorRT {trt.__version__} could not deserialize {plan_file} (built by another TensorRT version, "
                             "or for another GPU)")
    return TensorRtCausalLM(engine)


def load_ort_engine(engine_dir, session_options: dict, threads: int | None = None, spinning: bool = True):
    """The `CausalLM` for a built ONNX Runtime engine folder, from the session options it was built
    with. `spinning`: False for an engine that takes turns with another on the same cores (a draft
    model), so its idle workers leave them to the other."""
    from pathlib import Path

    opts = session_options

    def session(model_file: str, spinning: bool = spinning):
        return make_ort_session(Path(engine_dir) / model_file, threads=threads or opts["threads"],
                                optimization=opts["optimization_level"], int4_compute=opts["int4_compute"],
                                providers=opts.get("providers", ["CPUExecutionProvider"]), spinning=spinning)

    decode = session(opts.get("model_file", "engine.onnx"))
    if opts.get("graph") == "fused":
        prefill = session(opts["prefill_model_file"], spinning=False) if opts.get("prefill_model_file") else None
        openvino = (openvino_engine(Path(engine_dir) / opts.get("model_file", "engine.onnx"), threads or opts["threads"], opts["max_sequence_length"])
                    if opts.get("prefill_runtime") == "openvino" else None)
        batch = session(opts["batch_model_file"]) if opts.get("batch_model_file") else None
        return FusedOrtCausalLM(decode, opts["max_sequence_length"], prefill, openvino, batch, opts.get("batch_min_rows", 0),
                                openvino_batch=opts.get("batch_kernel") == "openvino_paged")
    return OrtCausalLM(decode)


class TensorRtCausalLM:
    """`forward(input_ids, state)` over a TensorRT engine. Buffers are torch CUDA tensors; the KV
    cache stays on the GPU between steps (each step's present tensors are the next step's past)."""

    def __init__(self, engine):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                       trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
        self.dtypes = {n: torch_dtype[engine.get_tensor_dtype(n)] for n in names}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        kv_shape = engine.get_tensor_shape(self.past_names[0])
        self.kv_heads, self.head_dim = kv_shape[1], kv_shape[3]
        # TensorRT wants a non-null address even for an empty tensor (the first step's past).
        self._placeholder = torch.empty(1, device="cuda")

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()

    def forward(self, input_ids: np.ndarray, state: DecodeState | None) -> tuple[np.ndarray, DecodeState]:
        torch = self.torch
        batch, seq = input_ids.shape
        past_len = state.length if state else 0
        cache = state.cache if state else [torch.empty((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtypes[n], device="cuda")
                                           for n in self.past_names]
        positions, mask = positions_and_mask(batch, past_len, seq)
        host = {"input_ids": input_ids.astype(np.int64), "attention_mask": mask, "position_ids": positions}
        tensors = {n: torch.from_numpy(np.ascontiguousarray(a)).to("cuda").to(self.dtypes[n]) for n, a in host.items()}
        tensors.update(zip(self.past_names, cache))
        for name in self.inputs:
            self.context.set_input_shape(name, tuple(tensors[name].shape))
            self.context.set_tensor_address(name, self._address(tensors[name]))
        outputs = {}
        for name in self.outputs:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, self._address(outputs[name]))
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        logits = outputs["logits"].float().cpu().numpy()  # .cpu() waits for the stream
        return logits, DecodeState([outputs[n] for n in self.present_names], past_len + seq)
