"""Speculative decoding, prefix reuse and KV that follows use, on the tiny bundles (plain and fused
graphs): greedy output is token for token what it is without them, and sampled output keeps the
target's distribution."""

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest

from onnxlm.runtime import load
from onnxlm.runtime.batch import Batch, generate_steps
from onnxlm.runtime.driver import GROWTH, MIN_ROOM, SharedRows
from onnxlm.runtime.generate import GenerationParams, new_seq
from onnxlm.runtime.prefix import Hit, PrefixCache
from onnxlm.runtime.speculate import (
    PRIOR,
    REMEASURE,
    TRIAL_ROUNDS,
    Costs,
    ModelDrafter,
    NgramDrafter,
    Speculator,
    expected_tokens,
    ngram_draft,
)
from tests.bundles import build_bundle, tiny_bundle

PROMPTS = [
    "one two three four five six seven one two three four five six seven one two three",
    "我们今天去公园散步。 Hello world! This is a much longer prompt, a much longer prompt",
]


@functools.cache
def other_bundle():
    """A second tiny model (other weights, the same tokenizer) to draft with."""
    root = Path(tempfile.mkdtemp(prefix="onnxlm-draft-test-"))
    return build_bundle(root / "draft", seed=7, graph="fused")


def tokens(steps):
    out: dict[int, list[int]] = {}
    for step in steps:
        for o in step.outputs:
            out.setdefault(o.seq, []).append(o.token_id)
    return [out[i] for i in sorted(out)]


def echo_prompt(engine, prompt, n=16):
    """The prompt followed by the model's own greedy continuation, twice: text whose continuation the
    n-gram drafter can find in the prompt (at most ~64 tokens: the tiny models see 128)."""
    ids = engine.tokenizer.encode(prompt)[:20]
    more = engine.generate(ids, max_new_tokens=n, ignore_eos=True).token_ids
    return ids + more + ids[1:] + more[: n // 2]


def hold_costs(spec, realized: bool = True):
    """Costs under which drafting pays (cheap verifies, a draft step at a tenth of a target step), held
    there: the tiny model's own timings vary and are not these. realized: also take every source's
    rounds as faster than plain ones (else they are timed, see Speculator.realized)."""
    spec.costs.seconds = {1: 1.0, **{w: 1.0 + 0.05 * w for w in range(2, 10)}}
    spec.costs.draft_step = 0.1
    spec.costs.observe = spec.costs.observe_draft = lambda *a: None
    if realized:
        spec.realized = lambda source: True
    return spec


def greedy_seqs(engine, prompts, limits) -> list:
    """One greedy sequence per prompt, each ending after its limit's tokens (the end of sequence ignored)."""
    return [
        new_seq(p, GenerationParams(max_new_tokens=n, ignore_eos=True), engine.tokenizer, engine.model.facts)
        for p, n in zip(prompts, limits, strict=True)
    ]


def admit(batch, seqs, keys, out) -> None:
    """seqs[k] for each k of `keys` prefilled and joined to `batch`; their first tokens into out[k]."""
    adm = batch.admit([seqs[k] for k in keys], keys)
    adm.run()
    for o in batch.join(adm):
        out[o.seq].append(o.token_id)


def step_round(batch, out) -> None:
    """One decode round of `batch`: each emitted token into out[seq]; finished rows leave."""
    for emitted in batch.step():
        for o in emitted:
            out[o.seq].append(o.token_id)
    batch.leave([row for row, s in enumerate(batch.seqs) if s.finish_reason is not None])


# --- no model -----------------------------------------------------------------------------------------
def test_ngram_draft_copies_what_followed_the_latest_match():
    ctx = np.array([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3, 4])
    assert ngram_draft(ctx, 3, n_max=3, n_min=2) == [7, 8, 2]  # latest earlier "2 3 4" at index 6
    assert ngram_draft(ctx, 10, n_max=3, n_min=2) == [7, 8, 2, 3, 4]  # up to the context's end
    # a longer match wins over a later, shorter one: "1 2 3 4" at 0 against "2 3 4" at 6
    ctx = np.array([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 1, 2, 3, 4])
    assert ngram_draft(ctx, 2) == [5, 9]
    assert ngram_draft(ctx, 2, n_max=3) == [7, 8]  # capped at 3: the latest of the 3-token matches
    assert ngram_draft(np.array([4, 5, 6, 5]), 2) == []  # one token matches: below n_min
    assert ngram_draft(np.array([4, 5, 6, 5]), 2, n_min=1) == [6, 5]
    assert ngram_draft(np.array([7, 7, 7, 7]), 3, n_max=8) == [7]  # overlapping: the earlier "7 7 7"
    assert ngram_draft(np.array([5, 6, 7, 8]), 4) == []  # no repeat, no draft
    assert ngram_draft(np.array([5]), 4) == []


def test_ngram_draft_by_default_prefers_a_match_longer_than_four_tokens():
    """An earlier occurrence matching 6 tokens wins over a later one matching 4 (NGRAM_MAX = 8)."""
    ctx = np.array([9, 1, 2, 3, 4, 5, 6, 70, 71, 8, 3, 4, 5, 6, 80, 81, 1, 2, 3, 4, 5, 6])
    assert ngram_draft(ctx, 2) == [70, 71]
    assert ngram_draft(ctx, 2, n_max=4) == [80, 81]  # capped at 4: the latest 4-token match


def test_ngram_draft_matches_a_search_of_every_window():
    rng = np.random.default_rng(3)
    for _ in range(300):
        ctx = rng.integers(0, 4, rng.integers(1, 40))
        n_max, n_min = int(rng.integers(2, 9)), int(rng.integers(1, 3))
        want = []
        for n in range(min(n_max, len(ctx) - 1), n_min - 1, -1):
            hits = [s for s in range(len(ctx) - n) if (ctx[s : s + n] == ctx[len(ctx) - n :]).all()]
            if hits:
                want = ctx[hits[-1] + n : hits[-1] + n + 5].tolist()
                break
        assert ngram_draft(ctx, 5, n_max, n_min) == want, (ctx, n_max, n_min)


def test_k_follows_acceptance_and_cost():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    spec = Speculator(k_max=8)
    spec.join([None], None)
    spec.costs.seconds = {1: 1.0, **{k + 1: 1.0 + 0.1 * k for k in range(1, 9)}}
    spec.evidence = [[0.9, 1.0]]
    assert spec.choose([8]) >= 4  # cheap verification and high acceptance: a long draft
    spec.evidence = [[0.05, 1.0]]
    assert spec.choose([8]) == 0  # drafts that are never kept: speculation stops
    spec.costs.seconds = {1: 1.0, **{k + 1: 1.0 + 0.9 * k for k in range(1, 9)}}
    spec.evidence = [[0.6, 1.0]]
    assert spec.choose([8]) == 0  # verification as dear as decoding: no gain at 60%
    assert spec.choose([0]) == 0  # nothing to draft


def test_point_mass_acceptance_keeps_the_target_distribution():
    """The rule verification applies (sample the target, keep the draft while they agree), checked
    against a known distribution: the emitted token is distributed as p, the draft kept with p(d)."""
    rng = np.random.default_rng(0)
    from onnxlm.runtime.sampling import make_sampler

    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p)[None, :]
    sampler = make_sampler(temperature=1.0, seed=1)
    draft = 1
    emitted = np.array([int(sampler(logits)[0]) for _ in range(20000)])
    kept = emitted == draft
    assert abs(kept.mean() - p[draft]) < 0.015
    freq = np.bincount(emitted, minlength=4) / len(emitted)
    assert np.abs(freq - p).max() < 0.015
    del rng


def test_prefix_cache_lookup_store_and_bounds():
    kv = lambda n, v=1.0: [np.full((2, n, 4), v, np.float32) for _ in range(4)]  # noqa: E731
    cache = PrefixCache(max_bytes=4 * 2 * 40 * 4 * 4, min_tokens=4)
    assert cache.lookup(list(range(30))) is None
    assert cache.store(list(range(20)), kv(20))
    n, got, *_ = cache.lookup(list(range(25)) + [99])
    assert n == 20 and got[0].shape == (2, 20, 4)
    n, _, logits, _ = cache.lookup(list(range(20)))  # the whole prompt cached: two tokens are left to prefill
    assert n == 18 and logits is None  # (no entry kept the logits after this prompt; see chunk_end)
    assert cache.lookup([0, 1, 2, 5, 6]) is None  # shares fewer than min_tokens
    assert cache.store(list(range(30)), kv(30, 2.0))  # extends the first: replaces it
    assert len(cache) == 1 and cache.nbytes == sum(a.nbytes for a in kv(30))
    assert cache.store([7] * 25, kv(25))  # over the budget together: the least recent goes
    assert len(cache) == 1 and cache.lookup(list(range(30)) + [1]) is None
    assert cache.stats()["hits"] == 2
    assert not cache.store([1, 2], kv(2))  # shorter than min_tokens
    with pytest.raises(ValueError, match="KV of"):
        cache.store(list(range(10)), kv(9))


def test_prefix_cache_keeps_the_logits_after_a_prompt():
    """A prompt met again whole reuses every position and the logits that followed it; an entry that
    extends another takes over its ends; the logits count in the byte budget."""
    kv = lambda n: [np.full((2, n, 4), 1.0, np.float32) for _ in range(4)]  # noqa: E731
    after = np.arange(10, dtype=np.float32)
    cache = PrefixCache(max_bytes=1 << 20, min_tokens=4)
    assert cache.store(list(range(30)), kv(30), ends={20: after, 31: after})  # 31: past the tokens, dropped
    assert cache.nbytes == sum(a.nbytes for a in kv(30)) + after.nbytes
    hit = cache.lookup(list(range(20)))
    assert hit.n == 20 and hit.kv[0].shape == (2, 20, 4) and np.array_equal(hit.logits, after)
    hit = cache.lookup(list(range(21)))  # a prompt no entry served whole: two tokens are left to run
    assert hit.n == 19 and hit.logits is None
    later = np.ones(10, np.float32)
    assert cache.store(list(range(40)), kv(40), ends={30: later})  # the next turn: replaces the first
    assert len(cache) == 1
    assert np.array_equal(cache.lookup(list(range(20))).logits, after)
    assert np.array_equal(cache.lookup(list(range(30))).logits, later)


def test_prefix_cache_keeps_kinds_apart():
    """KV computed with a longrope graph's long factors (kind 1) is never reused by a short prompt
    (kind 0), and the other way round; storing one kind leaves the other's entry in place."""
    kv = lambda n, v=1.0: [np.full((2, n, 4), v, np.float32) for _ in range(4)]  # noqa: E731
    cache = PrefixCache(max_bytes=1 << 20, min_tokens=4)
    assert cache.store(list(range(20)), kv(20), kind=0)
    assert cache.lookup(list(range(25)), kind=1) is None
    assert cache.store(list(range(30)), kv(30, 2.0), kind=1)  # a prefix of another kind is no duplicate
    assert len(cache) == 2
    n, got, *_ = cache.lookup(list(range(35)), kind=0)
    assert n == 20 and got[0][0, 0, 0] == 1.0
    n, got, *_ = cache.lookup(list(range(35)), kind=1)
    assert n == 30 and got[0][0, 0, 0] == 2.0


# --- greedy identity ------------------------------------------------------------------------------
def test_ngram_speculation_is_token_identical_and_drafts(engine):
    prompts = [echo_prompt(engine, p) for p in PROMPTS]
    params = GenerationParams(max_new_tokens=40, ignore_eos=True)
    plain = tokens(generate_steps(engine.model, engine.tokenizer, prompts, params))
    spec = NgramDrafter()
    fast = tokens(generate_steps(engine.model, engine.tokenizer, prompts, params, speculator=spec))
    assert fast == plain
    assert spec.drafted > 0 and spec.accepted > 0 and spec.speculated > 0
    assert spec.accepted < spec.drafted or spec.rounds < 40  # rounds that emitted several tokens
    for p in prompts:  # alone, and through every public method
        alone = engine.generate(p, max_new_tokens=40, ignore_eos=True).token_ids
        engine.use_draft("ngram")
        try:
            assert engine.generate(p, max_new_tokens=40, ignore_eos=True).token_ids == alone
            assert [c.token_id for c in engine.stream(p, max_new_tokens=40, ignore_eos=True)] == alone
        finally:
            engine.use_draft(None)
    engine.use_draft("ngram")
    try:
        batch = engine.generate_batch(prompts, max_new_tokens=40, ignore_eos=True)
    finally:
        engine.use_draft(None)
    assert [c.token_ids for c in batch] == plain


def test_speculation_respects_stops_and_limits(engine):
    prompt = echo_prompt(engine, PROMPTS[0])
    base = engine.generate(prompt, max_new_tokens=30, ignore_eos=True)
    stop_at = base.token_ids[12]
    engine.use_draft("ngram")
    try:
        for n in (1, 2, 7, 30):
            got = engine.generate(prompt, max_new_tokens=n, ignore_eos=True)
            assert got.token_ids == base.token_ids[:n] and got.finish_reason == "length"
        got = engine.generate(prompt, max_new_tokens=30, stop_token_ids=[stop_at], ignore_eos=True)
        cut = base.token_ids.index(stop_at) + 1
        assert got.token_ids == base.token_ids[:cut] and got.finish_reason == "stop"
        text = engine.tokenizer.decode(base.token_ids[5:9])
        if text.strip():
            got = engine.generate(prompt, max_new_tokens=30, stop=text.strip(), ignore_eos=True)
            assert got.finish_reason == "stop" and text.strip() not in got.text
    finally:
        engine.use_draft(None)


def test_draft_model_speculation_is_token_identical(engine):
    draft = load(other_bundle().path, threads=2)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = GenerationParams(max_new_tokens=24, ignore_eos=True)
    plain = tokens(generate_steps(engine.model, engine.tokenizer, prompts, params))
    for drafter in (draft.model, engine.model):  # another model, and the target itself (all agree)
        for lookup in (True, False):
            spec = ModelDrafter(drafter, k_max=4, lookup=lookup)
            got = tokens(generate_steps(engine.model, engine.tokenizer, prompts, params, speculator=spec))
            assert got == plain
            assert spec.drafted > 0
    assert spec.accepted == spec.drafted  # the target drafting for itself: every draft kept


def test_a_draft_model_prefills_joining_rows_a_chunk_a_round_after_their_first_token(engine):
    """The first token does not wait for the draft's prefill: the draft prefills joining rows a chunk
    per round (plain rounds meanwhile) once it is asked to draft. Rows joining late, leaving while
    the draft prefills them, or leaving while others wait for it keep every row's greedy tokens."""
    draft = load(other_bundle().path, threads=2)
    prompts = [engine.tokenizer.encode(PROMPTS[0])[:12], [9, 10, 11], echo_prompt(engine, PROMPTS[1]), [5, 6]]
    # the second row leaves while the draft prefills the third, the fourth while it is being prefilled
    limits = [30, 12, 20, 3]

    def run(spec):
        seqs = greedy_seqs(engine, prompts, limits)
        batch, out, held = Batch(engine.model, speculator=spec), {i: [] for i in range(4)}, []
        admit(batch, seqs, [0, 1], out)
        held.append(None if spec is None else len(spec.fed))
        for r in range(40):
            if r == 4:
                admit(batch, seqs, [2, 3], out)
            step_round(batch, out)
            held.append(None if spec is None else len(spec.fed))
            if not batch.seqs:
                break
        return [out[i] for i in range(4)], held

    plain, _ = run(None)
    assert [len(t) for t in plain] == limits
    spec = ModelDrafter(draft.model, k_max=4, lookup=False, chunk=8)
    hold_costs(spec)
    got, held = run(spec)
    assert got == plain
    assert spec.drafted > 0
    assert held[0] == 0  # the first tokens came before the draft held any row
    assert held.index(2) >= 2  # the first rows' prompts (12 tokens) a chunk of 8 a round
    assert not spec.unfed and spec.job is None


def test_a_draft_model_lets_go_of_rows_when_an_earlier_one_leaves_before_new_ones_are_in(engine):
    """Three rows the draft holds, a fourth still being prefilled, and the first leaves: the batch moves
    its last row (the unfed one) into the first's place, so the draft lets go of the rows from there
    on and takes them up again later; every row keeps its greedy tokens."""
    prompts = [[7, 8, 9], [10, 11, 12, 13], [14, 15], echo_prompt(engine, PROMPTS[1])]
    limits = [8, 24, 24, 16]

    def run(spec):
        seqs = greedy_seqs(engine, prompts, limits)
        batch, out, states = Batch(engine.model, speculator=spec), {i: [] for i in range(4)}, []
        admit(batch, seqs, [0, 1, 2], out)
        step_round(batch, out)
        admit(batch, seqs, [3], out)
        while batch.seqs:
            if spec is not None:
                states.append((len(spec.fed), len(spec.unfed)))
            step_round(batch, out)
        return [out[i] for i in range(4)], states

    plain, _ = run(None)
    spec = ModelDrafter(engine.model, k_max=2, lookup=False, chunk=8)  # the target drafting for itself
    hold_costs(spec)
    got, states = run(spec)
    assert got == plain
    assert (3, 1) in states  # three rows held while the fourth was prefilled
    assert any(held < 2 and unfed >= 2 for held, unfed in states)  # let go of rows after the first
    assert spec.accepted == spec.drafted > 0


def test_a_draft_model_skips_a_prefill_that_would_not_pay_back(engine):
    """Prefilling the draft costs per position of context; with a few tokens to go after a long
    prompt it would cost more than drafting saves, so the draft never prefills those rows: they
    decode plain, or with the lookup's drafts (same tokens either way)."""
    draft = load(other_bundle().path, threads=2)
    ids = echo_prompt(engine, PROMPTS[1])
    for new_tokens, prefills in ((4, False), (40, True)):
        params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
        plain = tokens(generate_steps(engine.model, engine.tokenizer, [ids], params))
        for lookup in (False, True):
            spec = ModelDrafter(draft.model, k_max=4, lookup=lookup)
            hold_costs(spec)
            spec.costs.draft_position = 0.05  # a position of the draft's prefill: 1/20 of a target step
            start, started = spec.rows.start, []
            spec.rows.start = lambda *a, start=start, seen=started: seen.append(a) or start(*a)
            got = tokens(generate_steps(engine.model, engine.tokenizer, [ids], params, speculator=spec))
            assert got == plain
            assert bool(started) == prefills, (new_tokens, lookup, spec.stats())
            if lookup and not prefills:  # the echo prompt's continuation is in it: the lookup drafts
                assert spec.stats()["lookup_drafted"] > 0


def test_a_draft_models_new_rows_start_from_what_its_earlier_rows_kept(engine):
    """A draft model's acceptance belongs to the pair more than to the text: rows joining later (the
    next request, sharing the Engine's costs) start from what earlier rows kept, not from PRIOR."""
    first = ModelDrafter(engine.model, k_max=4, lookup=False)
    assert first.prior() == PRIOR
    first.join([None], None)
    first.feedback(0, 4, 3)  # 3 kept, the 4th rejected: 4 positions checked, not yet enough
    assert first.prior() == PRIOR
    for _ in range(4):
        first.feedback(0, 4, 3)
    assert first.prior() == pytest.approx(0.75, abs=0.01)
    later = ModelDrafter(engine.model, k_max=4, lookup=False)
    later.costs = first.costs  # as Engine.speculator hands each its costs
    later.join([None, None], None)
    assert later.accept == pytest.approx([first.prior()] * 2)
    lookup = NgramDrafter()
    lookup.costs = first.costs
    lookup.join([None], None)
    assert lookup.accept == [PRIOR]  # prompt lookup's acceptance is the text's
    first.free()
    later.free()


def test_a_draft_model_takes_the_lookups_drafts_where_they_are_worth_more(engine):
    """Text that repeats its prompt: rounds where an n-gram match is found and worth more than the
    draft model's steps use it, and the draft model runs fewer steps; output equals plain decoding."""
    draft = load(other_bundle().path, threads=2)
    ids = echo_prompt(engine, PROMPTS[0])
    params = GenerationParams(max_new_tokens=24, ignore_eos=True)
    plain = tokens(generate_steps(engine.model, engine.tokenizer, [ids], params))
    calls, stats = {}, {}
    for lookup in (True, False):
        spec = ModelDrafter(draft.model, k_max=4, lookup=lookup)
        hold_costs(spec)
        decode, calls[lookup] = spec.rows.decode, []
        spec.rows.decode = lambda t, decode=decode, seen=calls[lookup]: seen.append(t) or decode(t)
        got = tokens(generate_steps(engine.model, engine.tokenizer, [ids], params, speculator=spec))
        assert got == plain
        stats[lookup] = spec.stats()
    assert stats[True]["lookup_drafted"] > 0 and stats[True]["drafted"] >= stats[True]["lookup_drafted"]
    assert "lookup_drafted" not in stats[False]
    assert len(calls[True]) < len(calls[False])


def test_target_and_draft_sessions_do_not_spin_between_runs(engine, caplog):
    """They take turns on the same cores: a session spinning after its run would slow the other's."""
    from onnxlm.runtime.session import spins_when_idle

    paired = load(engine.bundle_dir, threads=2, draft=other_bundle().path)
    assert not spins_when_idle(paired.model.session) and not spins_when_idle(paired.draft.session)
    assert paired.speculator().costs.draft_ratio > 0  # a draft step timed at load
    assert spins_when_idle(engine.model.session)  # alone, spinning between steps pays
    with caplog.at_level("WARNING"):
        engine.use_draft(paired.draft)
    engine.use_draft(None)
    assert "spinning" in caplog.text


def test_draft_bundle_must_share_the_tokenizer(engine, tmp_path):
    import json
    import shutil

    from onnxlm.bundle import BundleError

    copy = tmp_path / "draft"
    shutil.copytree(other_bundle().path, copy)
    tok = copy / "tokenizer.json"
    tok.write_text(tok.read_text() + "\n")  # another file: the check compares the manifests' hashes
    manifest = json.loads((copy / "onnxlm.json").read_text())
    from onnxlm.bundle import sha256_file

    manifest["files"]["tokenizer.json"] = {"size": tok.stat().st_size, "sha256": sha256_file(tok)}
    (copy / "onnxlm.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="tokenizer"):
        load(engine.bundle_dir, draft=copy)
    with pytest.raises(ValueError, match="draft"):
        engine.use_draft("bigram")


def test_sampled_speculation_keeps_the_distribution(engine):
    """Tokens 2-4 at temperature 1 over many seeds, with and without n-gram speculation (other seeds):
    their distributions agree (a chi-square two-sample test at p > 0.001 on the common tokens)."""
    prompt = echo_prompt(engine, PROMPTS[0])
    counts = []
    for draft, seeds in ((None, range(0, 150)), ("ngram", range(1000, 1150))):
        engine.use_draft(draft)
        seen = []
        for s in seeds:
            got = engine.generate(prompt, max_new_tokens=4, temperature=1.0, seed=s, ignore_eos=True)
            seen += got.token_ids[1:4]
        engine.use_draft(None)
        counts.append(np.bincount(seen, minlength=engine.manifest.model.vocab_size))
    table = np.array(counts)
    table = table[:, table.sum(axis=0) >= 10]
    assert table.shape[1] >= 2
    assert chi2_pvalue(table) > 0.001


def chi2_pvalue(table: np.ndarray) -> float:
    """Pearson's chi-square test of a 2 x n contingency table; the p-value by Wilson-Hilferty."""
    import math

    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    df = table.shape[1] - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


# --- prefix reuse ---------------------------------------------------------------------------------
def test_chat_reuses_the_earlier_turns(engine):
    history = [
        {"role": "system", "content": "You answer questions about the weather."},
        {"role": "user", "content": "Is it warm today?"},
    ]
    first = engine.chat(history, max_new_tokens=10, ignore_eos=True)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    second = engine.chat(history, max_new_tokens=10, ignore_eos=True)
    if engine.model.io.shared:
        assert second.usage.cached_tokens >= first.usage.prompt_tokens - 1
        assert engine.prefix_cache.hits >= 1
    else:  # the concat graph keeps no prefix: it says so by reusing nothing
        assert second.usage.cached_tokens == 0
    cold = load(engine.bundle_dir, threads=2, prefix_cache_mb=0)
    assert cold.prefix_cache is None
    again = cold.chat(history, max_new_tokens=10, ignore_eos=True)
    assert again.token_ids == second.token_ids and again.usage.cached_tokens == 0


def test_the_same_chat_again_runs_nothing_before_its_first_token(engine, monkeypatch):
    """A request met before whole (a retry, the same question again) reuses every prompt position and
    the logits that followed the prompt: no model call before its first token, the same tokens at
    temperature 0 and the same first-token logprob to the bit."""
    ask = [{"role": "user", "content": "Name three colours of the rainbow, please."}]
    first = engine.chat(ask, max_new_tokens=6, ignore_eos=True, logprobs=True)
    if not engine.model.io.shared:
        return  # the concat graph keeps no prefix (test_chat_reuses_the_earlier_turns)
    calls = []
    step = engine.model.step
    monkeypatch.setattr(engine.model, "step", lambda *a, **k: calls.append(a[0].shape) or step(*a, **k))
    again = engine.chat(ask, max_new_tokens=6, ignore_eos=True, logprobs=True)
    assert again.usage.cached_tokens == first.usage.prompt_tokens
    assert again.token_ids == first.token_ids and again.logprobs[0] == first.logprobs[0]
    assert len(calls) == 5  # the five decode steps after the first token, no prefill
    more = engine.chat([*ask, {"role": "assistant", "content": first.text}], max_new_tokens=2)
    assert 0 < more.usage.cached_tokens < more.usage.prompt_tokens  # a longer prompt still prefills its rest


def test_a_prefill_keeps_room_after_a_row_it_finished(engine):
    """A long prompt mostly or wholly reused from the prefix cache is done after its first chunk while a
    shorter new one goes on; each later chunk still pads the finished row, which needs room after
    what it holds (the job's buffer was sized to the longest prompt: GroupQueryAttention refused)."""
    if not engine.model.io.shared:
        return  # the concat graph reuses nothing
    long, short = list(range(40, 100)), list(range(200, 230))
    alone = SharedRows(engine.model, chunk=None).start([long])
    logits, kv = alone.run()[0].copy(), alone.cache.read(0)
    alone.free()
    for hit in (Hit(len(long) - 2, [a[:, :-2] for a in kv]), Hit(len(long), kv, logits)):
        job = SharedRows(engine.model, chunk=8).start([long, short], [hit, None])
        last = job.run()
        np.testing.assert_allclose(last[0], logits, atol=1e-4)
        assert [int(n) for n in job.cache.lengths] == [len(long), len(short)]
        job.free()


# --- KV that follows use ----------------------------------------------------------------------------
def test_shared_rows_grow_with_use_and_shrink_when_rows_leave():
    engine = load(tiny_bundle("fused").path, threads=2)
    rows = SharedRows(engine.model, chunk=None)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    job = rows.start(prompts)
    last = job.run()
    rows.join(job)
    assert rows.cache.capacity == max(map(len, prompts))  # the prompt, not prompt + max_new_tokens
    tok = last.argmax(-1)
    for _ in range(30):
        tok = rows.decode(tok)[:, 0].argmax(-1)
        need = int(rows.cache.lengths.max())
        assert need <= rows.cache.capacity <= max(int(need * GROWTH), need + MIN_ROOM) + 1
    rows.rollback(0, 5)
    assert rows.held(0) == len(prompts[0]) + 30 - 5
    big = rows.cache.nbytes()
    rows.drop(1)  # the longer row leaves
    assert rows.cache.nbytes() <= big
    rows.free()


def test_rows_bringing_unequal_tokens_fit_the_padded_chunk_up_to_the_context():
    """Every row needs room for the padded chunk after what it holds: a row bringing one token next to
    one bringing many (drafts, a draft model's catch-up), up to a row at the context's end (the call
    then runs in pieces). Logits equal those of each row alone."""
    engine = load(tiny_bundle("fused").path, threads=2)
    context = engine.model.facts.context_length
    ids = [3 + (i * 7) % 50 for i in range(context)]
    for held in (10, context - 4):  # the first row's prompt: short, then 4 tokens from the end
        alone = []
        for prompt, more in ((ids[:held], [ids[held]]), (ids[:5], ids[5:17])):
            rows = SharedRows(engine.model, chunk=None)
            job = rows.start([prompt])
            job.run()
            rows.join(job)
            alone.append(rows.decode([more])[0, : len(more)])
            rows.free()
        rows = SharedRows(engine.model, chunk=None)
        job = rows.start([ids[:held], ids[:5]])
        job.run()
        rows.join(job)
        both = rows.decode([[ids[held]], ids[5:17]])  # widths 1 and 12
        assert both.shape[1] == 12
        np.testing.assert_allclose(both[0, 0], alone[0][0], atol=1e-4)
        np.testing.assert_allclose(both[0, 1:], np.repeat(alone[0], 11, 0), atol=1e-4)  # repeats its last
        np.testing.assert_allclose(both[1], alone[1], atol=1e-4)
        assert rows.held(0) == held + 1 and rows.held(1) == 17
        rows.free()


def test_batch_joins_rows_prefilled_in_chunks_between_rounds(engine):
    """A prompt admitted while another row decodes runs a chunk at a time between rounds, and both
    rows' tokens equal running each alone."""
    a, b = (engine.tokenizer.encode(p) for p in PROMPTS)
    long, short = GenerationParams(max_new_tokens=40, ignore_eos=True), GenerationParams(max_new_tokens=12)
    alone = [
        engine.generate(a, max_new_tokens=40, ignore_eos=True).token_ids,
        engine.generate(b, max_new_tokens=12).token_ids,
    ]
    batch = Batch(engine.model, chunk=4)
    first = batch.admit([new_seq(a, long, engine.tokenizer, engine.model.facts)], [0])
    first.run()
    got = {0: [o.token_id for o in batch.join(first)], 1: []}
    late = batch.admit([new_seq(b, short, engine.tokenizer, engine.model.facts)], [1])
    rounds_during = 0
    while not late.step():
        for outs in batch.step():
            got[0] += [o.token_id for o in outs]
        rounds_during += 1
    assert rounds_during >= len(b) // 4 - 1 and not batch.seqs[0].finish_reason  # it kept decoding
    got[1] += [o.token_id for o in batch.join(late)]
    while batch.seqs:
        batch.leave([r for r, s in enumerate(batch.seqs) if s.finish_reason])
        if batch.seqs:
            for row, outs in enumerate(batch.step()):
                got[batch.keys[row]] += [o.token_id for o in outs]
    assert got[0] == alone[0] and got[1] == alone[1]


def test_costs_are_relative_to_a_one_token_step():
    c = Costs()
    assert c.relative(0) == 1.0 and c.relative(4) == pytest.approx(1.2)  # optimistic until measured
    c.observe(1, 0.500)  # each width's first call is a warm-up (a new shape), not its cost
    c.observe(5, 0.900)
    assert c.relative(4) == pytest.approx(1.2)
    c.observe(1, 0.010)
    c.observe(5, 0.020)
    assert c.relative(4) == pytest.approx(2.0)
    c.observe_draft(0.005)
    assert c.relative(4) == pytest.approx(4.0)


def test_a_lookup_round_is_charged_the_draft_models_later_catch_up():
    """A draft model feeds a lookup round's tokens in a wider call when it next drafts: that call's
    extra seconds per token are measured (not taken into a draft step's cost) and a lookup round's
    value pays for the tokens it is expected to emit."""
    c = Costs()
    c.seconds = {1: 0.020, 5: 0.030}  # a verify of 4 drafts: 1.5 steps
    assert c.lookup_value(2.0, 4, 1) == 2.0  # nothing measured: unchanged
    c.observe_draft_call(6, 0.010)  # before a draft step is known: not taken
    assert c.draft_token == 0.0
    c.observe_draft(0.004)
    c.observe_draft_call(2, 0.009)  # a routine call (2 tokens) is a step, not a catch-up
    assert c.draft_token == 0.0
    c.observe_draft_call(6, 0.014)  # 10 ms beyond a step over 5 extra tokens
    assert c.draft_token == pytest.approx(0.002)
    # 2.0 tokens a step at 1.5 steps: 3 tokens emitted, each 0.002 s of catch-up = 0.3 steps more
    assert c.lookup_value(2.0, 4, 1) == pytest.approx(3.0 / 1.8)
    assert c.lookup_value(4.0, 4, 2) == pytest.approx(6.0 / 1.8)  # two rows: per row the same


def test_acceptance_estimate_counts_only_checked_positions():
    """Drafts of 6 whose positions are each kept with probability 0.8 once those before were: the
    estimate settles near 0.8 (accepted / drafted would say ~0.55)."""
    rng = np.random.default_rng(0)
    spec = Speculator(k_max=6)
    spec.join([None], None)
    seen = []
    for i in range(3000):
        kept = 0
        while kept < 6 and rng.random() < 0.8:
            kept += 1
        spec.feedback(0, 6, kept)
        if i >= 1000:
            seen.append(spec.accept[0])
    assert abs(np.mean(seen) - 0.8) < 0.03
    assert spec.accepted / spec.drafted < 0.6  # the ratio the old estimate used


def test_a_stale_cost_does_not_keep_speculation_off():
    """Costs are only measured by speculating: a verify that once looked dear (a busy moment) is
    tried again now and then, and speculation resumes when it is cheap after all."""
    spec = Speculator(k_max=4)
    spec.join([None], None)
    spec.evidence = [[0.9, 1.0]]
    spec.costs.seconds = {1: 1.0, **{k + 1: 3.0 + k for k in range(1, 5)}}  # dear: plain wins
    chosen = []
    for _ in range(REMEASURE):
        chosen.append(spec.choose([4]))
        spec.rounds += 1
    tried = [k for k in chosen if k]
    assert len(tried) == 1  # once in REMEASURE rounds, the most promising length
    spec.costs.seconds = {1: 1.0, **{k + 1: 1.0 + 0.1 * k for k in range(1, 5)}}  # as measured then
    assert spec.choose([4]) >= 3


def test_a_shorter_verify_is_never_priced_above_a_longer_one():
    """Each width is re-measured only when chosen: one slow reading of a verify of 2 drafts, dearer
    than the 3-draft one measured since, must not keep the choice at one draft where two pay."""
    spec = Speculator(k_max=4)
    spec.join([None], None)
    spec.evidence = [[0.98, 1.0]]
    spec.costs.seconds = {1: 1.0, 2: 1.3, 3: 2.5, 4: 1.6}  # the 3-token call read slow once
    assert spec.costs.relative(2, drafting=False) == pytest.approx(1.6)
    assert spec.costs.relative(1, drafting=False) == pytest.approx(1.3)
    assert spec.costs.verify_seconds(5) is None  # unmeasured widths keep the optimistic guess
    assert spec.best([2])[0] == 2


def test_a_speculating_row_tries_the_next_longer_draft_now_and_then():
    """While one length is chosen, the next longer one is tried once in REMEASURE rounds (its cost
    is otherwise never measured again), within what the rows can draft."""
    spec = Speculator(k_max=4)
    spec.join([None], None)
    spec.evidence = [[0.9, 1.0]]
    spec.costs.seconds = {1: 1.0, 2: 1.2, 3: 2.5, 4: 3.5, 5: 4.5}  # one draft is best
    chosen = []
    for _ in range(REMEASURE):
        chosen.append(spec.choose([4]))
        spec.rounds += 1
    assert sorted(set(chosen)) == [0, 1, 2] and chosen.count(2) == 1 and chosen.count(0) == 1
    spec.rounds = REMEASURE // 2
    assert spec.choose([1]) == 1  # no longer draft to try


def test_draft_model_rounds_that_emit_slower_than_plain_ones_stop(engine):
    """The cost model counts a draft model's timed calls; a round also catches up, samples and keeps
    books. Where the model's rounds have emitted tokens more slowly (wall time per token) than plain
    rounds, it only drafts in retry rounds, until its rounds measure faster again."""
    ids = engine.tokenizer.encode(PROMPTS[1])
    params = GenerationParams(max_new_tokens=40, ignore_eos=True)
    plain = tokens(generate_steps(engine.model, engine.tokenizer, [ids], params))
    runs = {}
    for slow in (False, True):
        spec = ModelDrafter(engine.model, k_max=4, lookup=False)  # the target drafting for itself
        hold_costs(spec, realized=not slow)  # by the cost model, drafting pays
        if slow:  # measured: the model's rounds 30 ms a token, plain ones 20 (the tiny model's own follow)

            def join(seqs, rows, join=spec.join, spec=spec):
                join(seqs, rows)
                spec.round_time.update(
                    {None: [0.020, 1.0, TRIAL_ROUNDS], "model": [0.030, 1.0, TRIAL_ROUNDS]}
                )

            spec.join = join
        got = tokens(generate_steps(engine.model, engine.tokenizer, [ids], params, speculator=spec))
        assert got == plain
        runs[slow] = spec.stats()
    assert runs[False]["rounds"] < 15 and runs[False]["speculated_rounds"] >= 5  # ~5 tokens a round
    assert runs[True]["rounds"] >= 30 and 0 < runs[True]["speculated_rounds"] <= 2  # the retry round(s)


def test_round_wall_time_per_token_is_kept_by_source():
    spec = Speculator(k_max=4)
    spec.join([None], None)
    assert spec.realized("model")  # nothing timed yet
    spec.timed, spec.source = True, None
    spec.observe_round(0.020, 1)  # a plain round
    spec.source = "model"
    spec.observe_round(0.090, 1)  # a drafted round whose draft was rejected at once: 90 ms a token
    assert spec.realized("model")  # one round does not decide: a source has TRIAL_ROUNDS
    for _ in range(TRIAL_ROUNDS - 1):
        spec.observe_round(0.024, 3)  # then 8 ms a token
    # the first round weighs as the others: (90 + 2 x 24 ms, decayed) over (1 + 2 x 3 tokens, decayed)
    assert spec.round_spt["model"] == pytest.approx((0.09 * 0.81 + 0.024 * 0.9 + 0.024) / (0.81 + 2.7 + 3))
    assert spec.realized("model") and spec.realized("lookup")  # each source on its own rounds
    for _ in range(5):
        spec.observe_round(0.090, 3)  # 30 ms a token: slower than plain rounds
    assert not spec.realized("model")
    for _ in range(10):
        spec.observe_round(0.030, 3)  # 10 ms a token again: worth it once more
    assert spec.realized("model")
    spec.timed = False  # the round after rows join grows their buffers: not timed
    before = dict(spec.round_spt)
    spec.observe_round(5.0, 1)
    assert spec.round_spt == before
    spec.join([None], None)  # rows joining: a new batch, timed afresh
    assert spec.realized("model") and not spec.round_spt


def test_verify_gap_is_float_noise_on_float_graphs(engine, caplog):
    """The probe behind the exactness warning: a float graph computes several tokens in one call as
    it computes them one at a time, so speculating on it warns about nothing."""
    from onnxlm.runtime.speculate import verify_gap

    assert verify_gap(engine.model) < 1e-3
    fresh = load(engine.bundle_dir, threads=2, prefix_cache_mb=0)
    with caplog.at_level("WARNING", logger="onnxlm.runtime"):
        fresh.use_draft("ngram")
    assert fresh.verify_gap is not None and fresh.verify_gap < 1e-3
    assert not [r for r in caplog.records if "differently" in r.getMessage()]


def test_a_graph_that_verifies_inexactly_refuses_to_speculate_unless_asked(engine, monkeypatch, caplog):
    """Where several tokens in one call compute differently from one at a time (int4 weights over a
    float32 cache: tenths of a logit), speculation could change greedy output: loading with a draft
    fails with what to do instead, and speculates (warning) only when told to."""
    from click.testing import CliRunner

    from onnxlm.bundle import BundleError
    from onnxlm.cli import cli
    from onnxlm.runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "verify_gap", lambda model, probe, width: 0.5)
    with pytest.raises(BundleError, match=r"--kv-cache int8.*--draft-inexact"):
        load(engine.bundle_dir, threads=2, draft="ngram")
    fresh = load(engine.bundle_dir, threads=2)
    with pytest.raises(BundleError):
        fresh.use_draft("ngram")
    assert fresh.draft is None and fresh.speculator() is None  # left as it was
    with caplog.at_level("WARNING", logger="onnxlm.runtime"):
        spec = load(engine.bundle_dir, threads=2, draft="ngram", draft_inexact=True)
    assert spec.draft == "ngram" and [r for r in caplog.records if "anyway" in r.getMessage()]
    args = ["generate", str(engine.bundle_dir), "one two three", "--max-new-tokens", "4", "--draft", "ngram"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code != 0 and "--draft-inexact" in refused.output
    ran = CliRunner().invoke(cli, [*args, "--draft-inexact"])
    assert ran.exit_code == 0, ran.output


def test_identical_prompts_are_prefilled_once_and_decode_apart(engine):
    """n choices of one request share one prefill: their rows are copies, then each samples on its
    own (seeded rows equal the same seed run alone)."""
    ids = engine.tokenizer.encode(PROMPTS[1])
    params = [
        GenerationParams(max_new_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 1)
    ]
    seqs = [new_seq(ids, p, engine.tokenizer, engine.model.facts) for p in params]
    batch = Batch(engine.model)
    adm = batch.admit(seqs)
    assert adm.rows == [0, 0, 0] and adm.job.ids.shape[0] == 1  # one prompt row prefilled
    adm.run()
    got = {i: [o.token_id] for i, o in enumerate(batch.join(adm))}
    assert batch.rows.batch == 3
    while batch.seqs:
        for row, outs in enumerate(batch.step()):
            got[batch.keys[row]] += [o.token_id for o in outs]
        batch.leave([r for r, s in enumerate(batch.seqs) if s.finish_reason])
    alone = [
        engine.generate(ids, max_new_tokens=10, temperature=1.0, seed=s, ignore_eos=True).token_ids
        for s in (1, 2)
    ]
    assert got[0] == alone[0] and got[2] == alone[0] and got[1] == alone[1]
