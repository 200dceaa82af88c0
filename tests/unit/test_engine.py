"""The decode engine (pipeline/engine) on the tiny engine, without Triton: request checks, stop
strings, sampling, batches equal to single requests, chunked prefill, KV memory given back, and the
prefix cache."""

import re

import numpy as np
import pytest
from tokenizers import Tokenizer

from pipeline.artifacts import read_manifest
from pipeline.engine import (
    GenerationRequest,
    Limits,
    PromptLookup,
    RequestError,
    Scheduler,
    Sequence,
    advance,
    generate,
    parse_request,
    prompt_char_limit,
    sample,
    timed_greedy,
)
from pipeline.modeling.runtime import greedy_decode
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


def sinks(n):
    texts, reasons = [""] * n, [None] * n

    def sink(i):
        def emit(delta, finish):
            assert reasons[i] is None, "text after the end"
            texts[i] += delta
            reasons[i] = finish
        return emit
    return texts, reasons, sink


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


def test_validates_latency_times_the_scheduler_and_generates_what_greedy_does(engine):
    """validate's latency (pipeline.latency) runs `timed_greedy`: a prompt longer than one chunk,
    exactly `new_tokens` tokens (no end-of-sequence stop), the same ids as the reference loop."""
    lm, tokenizer = engine
    prompt = np.asarray(tokenizer.encode("def f(x):\n    return x * 2\n" * 6).ids, dtype=np.int64)
    assert len(prompt) > 20
    reference, _, _ = greedy_decode(lm, prompt, 12, lambda: 0.0)
    ticks = iter(range(1000))
    tokens, ttft, steps = timed_greedy(lm, tokenizer, prompt, 12, lambda: float(next(ticks)), prefill_chunk=16)
    assert tokens == reference and len(steps) == 11
    assert ttft >= 1 and all(s >= 1 for s in steps)  # every token's time is measured (the clock ticks per call)


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
    lm, tokenizer = engine
    prompts = [("def main():", 20), ("The quick brown fox", 12), ("import numpy as np\n", 9), ("Hello world", 30)]
    reqs = [parse_request(p, {"max_tokens": n}, tokenizer, LIMITS) for p, n in prompts]
    solo = [run(lm, tokenizer, [r], batch=False)[0][0] for r in reqs]
    texts, reasons, sink = sinks(4)
    running = Scheduler(lm, tokenizer, {256}, slots=3)
    assert running.batched  # the tiny recipe builds the fused engine: one forward per step for all rows
    running.admit(reqs[0], sink(0))
    for _ in range(3):
        running.step()
    running.admit_many([(reqs[1], sink(1)), (reqs[3], sink(3))])  # arrived together: rows of different lengths
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
    lm, tokenizer = engine

    class OneRowAtATime:  # what the portable engine offers: forward only
        def forward(self, ids, state):
            return lm.forward(ids, state)

    reqs = [parse_request(p, {"max_tokens": n}, tokenizer, LIMITS) for p, n in (("abc", 9), ("x = 1", 5), ("Hello", 7))]
    texts = [""] * 3
    running = Scheduler(OneRowAtATime(), tokenizer, {256}, slots=3)
    assert not running.batched
    generate(OneRowAtATime(), reqs, tokenizer, {256}, lambda i, d, f: texts.__setitem__(i, texts[i] + d), slots=3)
    assert texts == [run(lm, tokenizer, [r], batch=False)[0][0] for r in reqs]


LONG_PROMPT = "values = [" + ", ".join(str(i) for i in range(40)) + "]\n"  # ~150 byte-level tokens


def test_chunked_prefill_keeps_rows_moving_and_every_answer_is_its_solo_answer(engine):
    """A prompt of ~10 chunks joins a running row: the running row gains a token every step while
    the long prompt is prefilled chunk by chunk; a row joins mid-prefill; one is cancelled inside
    its prefill. Finished rows equal each request decoded alone."""
    lm, tokenizer = engine
    prompts = [("def main():", 40), (LONG_PROMPT, 10), ("Hello world, again", 12), (LONG_PROMPT[:70] + "#", 8)]
    reqs = [parse_request(p, {"max_tokens": n}, tokenizer, LIMITS) for p, n in prompts]
    assert len(reqs[1].prompt_ids) > 8 * 16
    solo = [run(lm, tokenizer, [r], batch=False)[0][0] for r in reqs]
    texts, reasons, sink = sinks(4)
    running = Scheduler(lm, tokenizer, {256}, slots=4, prefill_chunk=16)
    running.admit(reqs[0], sink(0))
    running.step()
    long_row = running.admit(reqs[1], sink(1))
    for _ in range(3):
        before = len(running.rows[0].seq.ids)
        running.step()
        assert len(running.rows[0].seq.ids) == before + 1  # the running row never waits a whole prompt
    assert 0 < long_row.prompt_done < len(reqs[1].prompt_ids) and long_row.next_token is None
    running.admit(reqs[2], sink(2))  # joins while the long prompt is mid-prefill
    cancelled = running.admit(reqs[3], sink(3))
    while cancelled.prompt_done == 0:
        running.step()
    assert cancelled.prompt_done < len(reqs[3].prompt_ids)
    running.cancel(cancelled)  # inside its prefill: its row is free at once, nothing was sent
    assert cancelled.seq.finish_reason == "cancelled" and texts[3] == "" and running.rows[cancelled.slot] is None
    while running.active:
        running.step()
    assert texts[:3] == solo[:3] and all(r in ("eos", "length") for r in reasons[:3])


def test_chunks_never_leave_a_one_token_tail():
    from pipeline.engine import chunk_size

    assert chunk_size(17, 16) == 15  # 16 would leave 1
    assert chunk_size(16, 16) == 16 and chunk_size(1, 16) == 1 and chunk_size(2, 16) == 2
    assert chunk_size(40, 1) == 0  # under two tokens of budget: wait for the next step
    assert chunk_size(3, 2) == 0  # 2 would leave 1


def rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_released_rows_give_their_memory_back_and_read_as_zeros():
    from pipeline.modeling.runtime import page_backed_zeros, release_pages

    rows, row_floats = 4, 4 << 20  # 16 MiB a row
    kv = page_backed_zeros((rows, row_floats))
    base = rss_bytes()
    kv[:] = 1.0
    touched = rss_bytes()
    assert touched - base > 0.9 * kv.nbytes
    release_pages(kv, kv[0].nbytes, 3 * kv[0].nbytes)  # rows 1 and 2
    assert touched - rss_bytes() > 0.9 * 2 * kv[0].nbytes
    assert not kv[1:3].any() and kv[0].all() and kv[3].all()


def test_a_finished_request_frees_its_kv_rows(engine):
    lm, tokenizer = engine
    running = Scheduler(lm, tokenizer, {256}, slots=2)
    released = []
    original = lm.release_rows
    try:
        lm.release_rows = lambda state, rows: (released.extend(rows), original(state, rows))
        running.admit(parse_request("abc", {"max_tokens": 3}, tokenizer, LIMITS), lambda d, f: None)
        while running.active:
            running.step()
    finally:
        del lm.release_rows
    assert released == [0] and running.state.cache["row_lengths"][0] == 0


SYSTEM = "You are Kiln's assistant. Answer in one short sentence, and never guess.\n"  # 4+ blocks of 16


def prefill_logits(lm, state, row, prompt, start):
    view = lm.row_view(state, row, 1)
    view.cache["row_lengths"][:] = start
    logits, view = lm.forward(np.asarray([prompt[start:]], dtype=np.int64), view, last_only=True, kernel="prefill")
    state.cache["row_lengths"][row] = view.cache["row_lengths"][0]
    return logits


def test_a_prefix_cache_hit_computes_exactly_what_a_miss_computes(engine):
    from pipeline.engine import BLOCK_TOKENS, PrefixCache

    lm, tokenizer = engine
    first = tuple(tokenizer.encode(SYSTEM + "Q: what is 2 + 2?").ids)
    second = tuple(tokenizer.encode(SYSTEM + "Q: name a colour.").ids)
    state = lm.empty_state(3)
    cache = PrefixCache(lm, 1 << 20)
    prefill_logits(lm, state, 0, first, 0)
    cache.store(state, 0, first)
    hit = cache.load(state, 1, second)
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert hit == shared // BLOCK_TOKENS * BLOCK_TOKENS >= 4 * BLOCK_TOKENS
    with_hit = prefill_logits(lm, state, 1, second, hit)
    miss = prefill_logits(lm, state, 2, second, 0)
    np.testing.assert_array_equal(with_hit, miss)  # bit for bit, not merely close
    for kv in state.cache["arrays"]:  # and the keys and values the hit's row goes on with
        np.testing.assert_array_equal(kv[1, :, :len(second)], kv[2, :, :len(second)])


def test_prefixes_never_mix_and_hits_are_counted(engine):
    """Three prompts through one scheduler with a prefix cache: the repeat of the first hits all
    its whole blocks but the last two tokens' block; the second shares only the system prompt;
    a prompt whose later block equals the first's but whose beginning differs hits nothing. Every
    answer equals the same request decoded alone without any cache."""
    from pipeline.engine import BLOCK_TOKENS

    lm, tokenizer = engine
    questions = [SYSTEM + "Q: what is 2 + 2?", SYSTEM + "Q: name a colour.", SYSTEM + "Q: what is 2 + 2?",
                 "x" * 16 + SYSTEM[16:] + "Q: what is 2 + 2?"]
    reqs = [parse_request(q, {"max_tokens": 12}, tokenizer, LIMITS) for q in questions]
    solo = [run(lm, tokenizer, [r], batch=False)[0][0] for r in reqs]
    running = Scheduler(lm, tokenizer, {256}, slots=2, prefix_cache_bytes=1 << 20)
    texts, _, sink = sinks(4)
    hits = []
    for i, req in enumerate(reqs):  # one after the other: each finds what the earlier ones left
        row = running.admit(req, sink(i))
        hits.append(row.cached)
        while running.active:
            running.step()
    assert texts == solo
    n = len(reqs[0].prompt_ids)
    assert hits[0] == 0 and hits[3] == 0
    assert hits[2] == (n - 2) // BLOCK_TOKENS * BLOCK_TOKENS
    assert 0 < hits[1] < hits[2]
    stats = running.prefix_cache.stats
    assert stats.hit_tokens == sum(hits) and stats.prompt_tokens == sum(len(r.prompt_ids) for r in reqs)
    assert 0 < stats.hit_rate < 1


def test_the_prefix_cache_stays_within_its_budget(engine):
    from pipeline.engine import PrefixCache

    lm, tokenizer = engine
    state = lm.empty_state(1)
    block_bytes = lm.read_positions(state, 0, 0, 16).nbytes
    cache = PrefixCache(lm, capacity_bytes=5 * block_bytes)
    for i in range(4):
        prompt = tuple(tokenizer.encode(f"{i} " + LONG_PROMPT[:60]).ids)
        prefill_logits(lm, state, 0, prompt, 0)
        cache.store(state, 0, prompt)
        assert cache.stats.bytes <= 5 * block_bytes
    assert cache.stats.evicted_blocks > 0
    assert cache.load(state, 0, prompt) > 0  # the newest prompt survived


# ------------------------------------------------------------------ speculative decoding (prompt lookup)

PROMPT_LOOKUP = {"method": "prompt_lookup", "max_draft_tokens": 8}
GROUNDED = ["The quick brown fox jumps over the lazy dog. The quick brown fox jumps",
            "def area(r):\n    return 3.14 * r * r\n\ndef area(r):\n",
            "abc abc abc abc abc abc abc abc"]


def generated(lm, tokenizer, prompt: str, max_tokens: int, speculative=None, temperature=0.0, seed=None, slots=1, top_k=0):
    scheduler = Scheduler(lm, tokenizer, set(), slots, speculative=speculative)
    request = GenerationRequest(tuple(tokenizer.encode(prompt).ids), max_tokens, temperature, top_k, seed=seed)
    row = scheduler.admit(request, lambda d, f: None)
    while scheduler.active:
        scheduler.step()
    return row.seq.ids, scheduler.draft_stats


@pytest.mark.parametrize("prompt", GROUNDED)
def test_prompt_lookup_gives_plain_decodings_greedy_tokens(engine, prompt):
    lm, tokenizer = engine
    plain, none = generated(lm, tokenizer, prompt, 48)
    fast, stats = generated(lm, tokenizer, prompt, 48, PROMPT_LOOKUP)
    assert fast == plain and none.verifications == 0
    assert stats.verifications > 0 and 0 < stats.accepted < stats.drafted  # drafts accepted and rejected mid-way


@pytest.mark.parametrize("drafts", ["right", "wrong"])
def test_drafts_fully_accepted_or_fully_rejected_give_plain_decodings_tokens(engine, monkeypatch, drafts):
    """A drafter that proposes exactly what plain decoding generates next (every draft accepted),
    or always something else (every draft rejected)."""
    lm, tokenizer = engine
    prompt = tokenizer.encode(GROUNDED[0]).ids
    plain, _ = generated(lm, tokenizer, GROUNDED[0], 40)

    def propose(self, tokens, room):
        done = len(tokens) - len(prompt)  # generated so far; the next ones are plain[done:]
        upcoming = plain[done:done + min(4, room)]
        return upcoming if drafts == "right" else [(t + 1) % 256 for t in upcoming]

    monkeypatch.setattr(PromptLookup, "propose", propose)
    fast, stats = generated(lm, tokenizer, GROUNDED[0], 40, PROMPT_LOOKUP)
    assert fast == plain and stats.drafted > 0
    assert stats.accepted == (stats.drafted if drafts == "right" else 0)
    if drafts == "right":  # up to 5 tokens a step
        assert stats.verifications <= len(plain) / 4
    else:  # one token a step, every step but the last (no room left to draft)
        assert stats.verifications == len(plain) - 2


def test_prompt_lookup_samples_the_tokens_plain_sampling_samples(engine):
    lm, tokenizer = engine
    for seed in range(3):
        plain, _ = generated(lm, tokenizer, GROUNDED[0], 40, temperature=0.7, seed=seed)
        fast, _ = generated(lm, tokenizer, GROUNDED[0], 40, PROMPT_LOOKUP, temperature=0.7, seed=seed)
        assert fast == plain


def test_rejected_drafts_leave_no_stale_keys_and_values(engine):
    """Mid-generation, the row's KV up to its length equals a fresh forward over the same tokens."""
    lm, tokenizer = engine
    scheduler = Scheduler(lm, tokenizer, set(), 1, speculative=PROMPT_LOOKUP)
    row = scheduler.admit(GenerationRequest(tuple(tokenizer.encode(GROUNDED[1]).ids), 60), lambda d, f: None)
    while len(row.seq.ids) < 30:
        scheduler.step()
    assert scheduler.draft_stats.drafted > scheduler.draft_stats.accepted  # something was rolled back
    length = int(scheduler.state.cache["row_lengths"][row.slot])
    tokens = [*row.prompt, *row.seq.ids][:-1]  # the last sampled token is the next step's input
    assert length == len(tokens)
    _, fresh = lm.forward(np.asarray([tokens], dtype=np.int64), None)
    np.testing.assert_allclose(lm.read_positions(scheduler.state, row.slot, 0, length), lm.read_positions(fresh, 0, 0, length),
                               rtol=1e-4, atol=1e-5)


def test_drafts_stop_at_the_context_limit(engine):
    lm, tokenizer = engine
    prompt = GROUNDED[2] * 7  # 223 byte-level tokens; with 33 new ones the 256-position buffers are full
    ids = tokenizer.encode(prompt).ids
    room = lm.max_sequence_length - len(ids)
    fast, stats = generated(lm, tokenizer, prompt, room, PROMPT_LOOKUP)
    assert fast == generated(lm, tokenizer, prompt, room)[0] and len(fast) == room and stats.accepted > 0


def test_several_decoding_rows_decode_one_token_each(engine):
    lm, tokenizer = engine
    scheduler = Scheduler(lm, tokenizer, set(), 2, speculative=PROMPT_LOOKUP)
    rows = [scheduler.admit(GenerationRequest(tuple(tokenizer.encode(p).ids), n), lambda d, f: None)
            for p, n in ((GROUNDED[0], 40), (GROUNDED[2], 10))]
    while rows[1].seq.finish_reason is None:
        scheduler.step()
        assert scheduler.draft_stats.verifications == 0  # two rows live: no drafts
    while scheduler.active:
        scheduler.step()
    assert scheduler.draft_stats.verifications > 0
    assert rows[0].seq.ids == generated(lm, tokenizer, GROUNDED[0], 40)[0]


def test_prompt_lookup_drafts_the_continuation_of_the_latest_match():
    drafter = PromptLookup(max_draft=4)
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3])
    assert drafter.propose(tokens, room=10) == [7, 8, 5, 1]
    assert drafter.propose(tokens, room=2) == [7, 8]
    assert drafter.propose(np.array([4, 5, 6]), room=10) == []
    for _ in range(PromptLookup.PAUSE_AFTER):
        drafter.update(drafted=4, accepted=0)
    assert drafter.propose(tokens, room=10) == [] and drafter.paused == PromptLookup.PAUSE_STEPS - 1


def test_prompt_lookup_keeps_the_sampled_distribution(engine):
    """Chi-square homogeneity of the 6th sampled token (top-k 8, temperature 1) over 200 seeds with
    plain decoding and 200 other seeds with prompt lookup: drafts must not bias what is sampled.
    Its power is for gross biases (measured: near-greedy sampling against temperature 1 gives 411
    against a limit of ~30); the tiny random model's flat distributions hide small ones, which is
    why the tests above also check seeded sampling token for token."""
    lm, tokenizer = engine
    counts = []
    for speculative, seeds in ((None, range(200)), (PROMPT_LOOKUP, range(1000, 1200))):
        sixth = [generated(lm, tokenizer, GROUNDED[1], 6, speculative, temperature=1.0, seed=seed, top_k=8)[0][5] for seed in seeds]
        counts.append(np.bincount(sixth, minlength=lm.vocab))
    table = np.array(counts, dtype=float)
    frequent = table.sum(0) >= 10  # categories with enough samples; the rest pooled
    table = np.column_stack([table[:, frequent], table[:, ~frequent].sum(1)])
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    df = table.shape[1] - 1
    # chi-square's 0.999 quantile (Wilson-Hilferty): a false alarm once in a thousand seeds' worth
    critical = df * (1 - 2 / (9 * df) + 3.09 * np.sqrt(2 / (9 * df))) ** 3
    assert df >= 2 and statistic < critical, (statistic, critical, table)


# ------------------------------------------------------------------ speculative decoding (draft model)

DRAFT_MODEL = {"method": "draft", "max_draft_tokens": 6}


class PerturbedDraft:
    """The engine with noise on its logits: a draft model of the same vocabulary that is right
    often, not always (drafts accepted, and rejected mid-way)."""

    def __init__(self, lm, scale: float):
        self.lm, self.scale, self.rng = lm, scale, np.random.default_rng(0)

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def forward(self, *args, **kwargs):
        logits, state = self.lm.forward(*args, **kwargs)
        return logits + self.rng.normal(0, self.scale, logits.shape).astype(np.float32), state


def drafted(lm, draft_lm, tokenizer, prompt: str, max_tokens: int, temperature=0.0, seed=None):
    scheduler = Scheduler(lm, tokenizer, set(), 1, speculative=DRAFT_MODEL, draft_lm=draft_lm)
    row = scheduler.admit(GenerationRequest(tuple(tokenizer.encode(prompt).ids), max_tokens, temperature, seed=seed), lambda d, f: None)
    while scheduler.active:
        scheduler.step()
    return row.seq.ids, scheduler.draft_stats


@pytest.mark.parametrize("prompt", GROUNDED[:2])
def test_a_draft_model_gives_plain_decodings_greedy_tokens(engine, prompt):
    lm, tokenizer = engine
    plain, _ = generated(lm, tokenizer, prompt, 48)
    same, stats = drafted(lm, lm, tokenizer, prompt, 48)  # the engine drafting for itself: nearly every draft kept
    assert same == plain and stats.accepted > 0.9 * stats.drafted and stats.verifications < len(plain) / 3
    noisy, stats = drafted(lm, PerturbedDraft(lm, 0.05), tokenizer, prompt, 48)
    assert noisy == plain and 0 < stats.accepted < stats.drafted  # kept and rejected mid-way


def test_a_draft_model_samples_the_tokens_plain_sampling_samples(engine):
    lm, tokenizer = engine
    for seed in range(3):
        plain, _ = generated(lm, tokenizer, GROUNDED[0], 40, temperature=0.7, seed=seed)
        assert drafted(lm, PerturbedDraft(lm, 0.05), tokenizer, GROUNDED[0], 40, temperature=0.7, seed=seed)[0] == plain


def test_the_draft_models_row_keeps_only_accepted_keys_and_values(engine):
    """Mid-generation, the draft engine's row holds a prefix of the row's text, computed as a fresh
    forward over that prefix computes it (rejected drafts rolled back, unseen tokens fed later)."""
    lm, tokenizer = engine
    scheduler = Scheduler(lm, tokenizer, set(), 1, speculative=DRAFT_MODEL, draft_lm=PerturbedDraft(lm, 0.05))
    row = scheduler.admit(GenerationRequest(tuple(tokenizer.encode(GROUNDED[1]).ids), 60), lambda d, f: None)
    while len(row.seq.ids) < 30:
        scheduler.step()
    assert 0 < scheduler.draft_stats.accepted < scheduler.draft_stats.drafted
    state = row.drafter.state
    length = int(state.cache["row_lengths"][0])
    text = [*row.prompt, *row.seq.ids]
    assert len(row.prompt) < length < len(text)
    _, fresh = lm.forward(np.asarray([text[:length]], dtype=np.int64), None)
    np.testing.assert_allclose(lm.read_positions(state, 0, 0, length), lm.read_positions(fresh, 0, 0, length), rtol=1e-4, atol=1e-5)


def test_draft_model_drafts_stop_at_the_context_limit(engine):
    lm, tokenizer = engine
    prompt = GROUNDED[2] * 7
    room = lm.max_sequence_length - len(tokenizer.encode(prompt).ids)
    fast, stats = drafted(lm, lm, tokenizer, prompt, room)
    assert fast == generated(lm, tokenizer, prompt, room)[0] and len(fast) == room and stats.accepted > 0


def test_a_draft_model_needs_its_engine():
    with pytest.raises(ValueError, match="draft engine"):
        Scheduler(FusedLike(), None, set(), 1, speculative=DRAFT_MODEL)


class FusedLike:
    """Enough of a fused engine for a scheduler to be made."""

    def row_view(self, state, start, rows):
        return state

    def empty_state(self, batch):
        return None


def test_a_request_can_turn_speculation_off(engine):
    lm, tokenizer = engine
    scheduler = Scheduler(lm, tokenizer, set(), 1, speculative=PROMPT_LOOKUP)
    request = GenerationRequest(tuple(tokenizer.encode(GROUNDED[2]).ids), 30, speculative=False)
    row = scheduler.admit(request, lambda d, f: None)
    while scheduler.active:
        scheduler.step()
    assert row.drafter is None and scheduler.draft_stats.verifications == 0
    assert row.seq.ids == generated(lm, tokenizer, GROUNDED[2], 30)[0]
    assert parse_request("hi", {"speculative": False}, tokenizer, LIMITS).speculative is False
    assert parse_request("hi", {}, tokenizer, LIMITS).speculative is True
