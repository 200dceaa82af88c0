"""The serving code's generation logic (pipeline/serving/generation.py) on the tiny engine, without
Triton: request checks, stop strings, sampling, and batches equal to single requests."""

import re

import numpy as np
import pytest
from tokenizers import Tokenizer

from pipeline.artifacts import read_manifest
from pipeline.modeling.runtime import greedy_decode
from pipeline.serving.generation import (
    GenerationRequest,
    Limits,
    RequestError,
    Sequence,
    advance,
    generate,
    parse_request,
    prompt_char_limit,
    sample,
)
from pipeline.targets import get_target

LIMITS = Limits(context_limit=256, max_tokens_cap=64, default_max_tokens=16)


@pytest.fixture(scope="module")
def engine(tiny_run):
    engine_dir = tiny_run["paths"]["build"]
    meta = read_manifest(engine_dir)["meta"]
    return get_target(meta["target"]).load(engine_dir, meta), Tokenizer.from_file(str(engine_dir / "tokenizer.json"))


def run(lm, tokenizer, requests, batch=True):
    texts, reasons = [""] * len(requests), [None] * len(requests)

    def emit(i, delta, finish):
        assert reasons[i] is None, "text after the end"
        texts[i] += delta
        reasons[i] = finish

    generate(lm, requests, tokenizer, {256}, emit, batch=batch)
    return texts, reasons


@pytest.mark.parametrize("text,params,message", [
    ("", {}, "text_input is empty"),
    ("  ", {}, "text_input is empty"),
    ("hi", {"max_tokens": 0}, "max_tokens must be between 1 and 64"),
    ("hi", {"max_tokens": 65}, "max_tokens must be between 1 and 64"),
    ("hi", {"temperature": -0.5}, "temperature must be >= 0"),
    ("hi", {"top_k": -1}, "top_k must be >= 0"),
    ("hi", {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ("y" * 250, {"max_tokens": 10}, "exceeds the context limit of 256 tokens"),
])
def test_bad_requests_name_the_field(engine, text, params, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        parse_request(text, params, engine[1], LIMITS)


class NeverTokenize:
    def encode(self, text):
        raise AssertionError("a prompt over the character limit was tokenized")


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(engine):
    tokenizer = engine[1]
    limit = prompt_char_limit(tokenizer, LIMITS.context_limit)
    limits = Limits(**{**LIMITS.__dict__, "max_prompt_chars": limit})
    with pytest.raises(RequestError, match=f"prompt of {limit + 1} characters cannot fit the context limit of 256 tokens"):
        parse_request("a" * (limit + 1), {}, NeverTokenize(), limits)
    # the bound is sound: text made of the vocabulary's longest entries, the fewest tokens per
    # character, still needs more tokens than the context holds once it is over the limit
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    longest = max(vocab, key=len)
    text = tokenizer.decode([vocab[longest]], skip_special_tokens=False) * (limit // len(longest) + 1)
    assert len(text) > limit and len(tokenizer.encode(text).ids) > LIMITS.context_limit
    assert parse_request("a short prompt", {}, tokenizer, limits).prompt_ids  # and ordinary prompts still pass


def test_greedy_equals_the_engines_decode_loop(engine):
    lm, tokenizer = engine
    req = parse_request("def f(x):", {"max_tokens": 12}, tokenizer, LIMITS)
    ids, _, _ = greedy_decode(lm, np.asarray(req.prompt_ids, dtype=np.int64), 12, lambda: 0.0)
    ids = ids[: ids.index(256)] if 256 in ids else ids
    texts, reasons = run(lm, tokenizer, [req])
    assert texts[0] == tokenizer.decode(ids, skip_special_tokens=True)
    assert reasons[0] in ("eos", "length")


def test_a_batch_answers_each_request_as_if_alone(engine):
    lm, tokenizer = engine
    reqs = [parse_request(p, {"max_tokens": n}, tokenizer, LIMITS) for p, n in [("a", 5), ("longer prompt here", 9), ("mid", 3)]]
    assert run(lm, tokenizer, reqs) == run(lm, tokenizer, reqs, batch=False)
    alone = [run(lm, tokenizer, [r])[0][0] for r in reqs]
    assert run(lm, tokenizer, reqs)[0] == alone


class CharTokenizer:
    """One character a token: makes stop-string cases exact."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_end_the_text_and_are_never_sent():
    req = GenerationRequest(prompt_ids=(1,), max_tokens=50, stop=("END",))
    seq, sent = Sequence(req, np.random.default_rng(0)), ""
    for ch in "abc EN":
        sent += advance(seq, ord(ch), CharTokenizer(), set())
        assert seq.finish_reason is None
    assert sent == "abc "  # "EN" held back: it may become the stop string
    sent += advance(seq, ord("D"), CharTokenizer(), set())
    assert seq.finish_reason == "stop" and sent == "abc "


def test_max_tokens_and_eos_flush_held_text():
    seq = Sequence(GenerationRequest(prompt_ids=(1,), max_tokens=3, stop=("xyz",)), np.random.default_rng(0))
    out = "".join(advance(seq, ord(c), CharTokenizer(), set()) for c in "abx")
    assert seq.finish_reason == "length" and out == "abx"
    seq = Sequence(GenerationRequest(prompt_ids=(1,), max_tokens=9, stop=("xyz",)), np.random.default_rng(0))
    out = "".join(advance(seq, t, CharTokenizer(), {0}) for t in (ord("a"), ord("x"), 0))
    assert seq.finish_reason == "eos" and out == "ax"


def test_sampling_follows_temperature_top_k_and_seed():
    logits = np.array([0.0, 5.0, 4.9, -3.0, 1.0])
    greedy = GenerationRequest(prompt_ids=(1,), max_tokens=1)
    assert sample(logits, greedy, np.random.default_rng(0)) == 1
    top2 = GenerationRequest(prompt_ids=(1,), max_tokens=1, temperature=1.0, top_k=2)
    draws = {sample(logits, top2, np.random.default_rng(s)) for s in range(50)}
    assert draws == {1, 2}
    a = [sample(logits, top2, np.random.default_rng(3)) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw
    nucleus = GenerationRequest(prompt_ids=(1,), max_tokens=1, temperature=1.0, top_p=0.3)
    assert {sample(logits, nucleus, np.random.default_rng(s)) for s in range(30)} == {1}


def test_requests_joining_a_running_batch_get_their_solo_greedy_output(engine):
    """In-flight batching: B and D join together after A has decoded 3 tokens, C after 5; D is
    cancelled mid-way.
    Each finished row's text equals the same request decoded alone; the cancelled row's slot is
    free at once and the others are unaffected."""
    from pipeline.serving.generation import InflightBatch

    lm, tokenizer = engine
    prompts = [("def main():", 20), ("The quick brown fox", 12), ("import numpy as np\n", 9), ("Hello world", 30)]
    reqs = [parse_request(p, {"max_tokens": n}, tokenizer, LIMITS) for p, n in prompts]
    solo = [run(lm, tokenizer, [r], batch=False)[0][0] for r in reqs]

    texts, reasons = [""] * 4, [None] * 4

    def sink(i):
        def emit(delta, finish):
            assert reasons[i] is None, "text after the end"
            texts[i] += delta
            reasons[i] = finish
        return emit

    running = InflightBatch(lm, tokenizer, {256}, slots=3)
    assert running.batched  # the tiny recipe builds the fused engine: one forward per step for all rows
    running.admit(reqs[0], sink(0))
    for _ in range(3):
        running.step()
    running.admit_many([(reqs[1], sink(1)), (reqs[3], sink(3))])  # arrived together: one prefill, rows of different lengths
    running.step()
    running.step()
    assert running.free == 0
    row_d = next(r for r in running.rows if r is not None and r.seq.request is reqs[3])
    running.cancel(row_d)
    assert running.free == 1 and row_d.seq.finish_reason == "cancelled"
    running.admit(reqs[2], sink(2))  # takes the cancelled row's slot
    while running.active:
        running.step()
    assert texts[:3] == solo[:3]
    assert reasons[3] is None and solo[3].startswith(texts[3])  # stopped where it was cancelled


def test_more_requests_than_rows_queue_and_each_gets_its_solo_output(engine):
    lm, tokenizer = engine
    reqs = [parse_request(f"{i} + {i} =", {"max_tokens": 4 + 3 * i}, tokenizer, LIMITS) for i in range(5)]
    texts = [""] * 5
    generate(lm, reqs, tokenizer, {256}, lambda i, d, f: texts.__setitem__(i, texts[i] + d), slots=2)
    assert texts == [run(lm, tokenizer, [r], batch=False)[0][0] for r in reqs]


def test_an_engine_without_row_placement_interleaves_rows_with_their_own_states(engine):
    """The portable engine cannot batch rows of different lengths: each row keeps its own state and
    a step advances them in turn; outputs still equal each request alone."""
    from pipeline.serving.generation import InflightBatch

    lm, tokenizer = engine

    class OneRowAtATime:  # what the portable engine offers: forward only
        def forward(self, ids, state):
            return lm.forward(ids, state)

    reqs = [parse_request(p, {"max_tokens": n}, tokenizer, LIMITS) for p, n in (("abc", 9), ("x = 1", 5), ("Hello", 7))]
    texts = [""] * 3
    running = InflightBatch(OneRowAtATime(), tokenizer, {256}, slots=3)
    assert not running.batched
    generate(OneRowAtATime(), reqs, tokenizer, {256}, lambda i, d, f: texts.__setitem__(i, texts[i] + d), slots=3)
    assert texts == [run(lm, tokenizer, [r], batch=False)[0][0] for r in reqs]
