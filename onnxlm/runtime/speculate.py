"""Speculative decoding: a cheap drafter proposes up to k tokens per row, the target model checks them
all in one forward pass (the driver's multi-token decode), and the tokens it would not have produced
leave the KV cache.

Verification samples each position from the target's own distribution and stops at the first token
that differs from the draft. Drafts here are deterministic (copied n-grams, or the draft model's
argmax), so this is the speculative-sampling acceptance rule for a draft distribution that is a point
mass: a draft token d is kept with probability p(d), and a rejected position emits a sample of p
conditioned on not being d. Every emitted token is therefore a sample of the target's distribution,
greedy output is token for token what it is without speculation, and a seeded sampler draws once per
emitted token, as it does without speculation.

Two drafters:
- NgramDrafter (prompt lookup): the longest recent n-gram match of the row's last tokens in its prompt
  and output so far; the tokens that followed it are the draft. Costs microseconds.
- ModelDrafter: a smaller bundle with the same tokenizer, run greedily on its own KV driver, kept in
  step with what the target accepted; a round where prompt lookup is worth more (by each source's
  acceptance and the measured costs) takes the lookup's drafts and spends no draft step. It prefills
  a row only once drafting is worth it and the prefill pays back over the row's remaining tokens, a
  chunk a round, after the row's first token.

k adapts: per row an acceptance estimate, per draft length the measured cost of a verify step relative
to a one-token step; each round takes the k with the most expected tokens per unit of time, and none
when no k beats plain decoding (so speculation turns itself off where it does not pay), with a
retry of the most promising k now and then, since only speculating updates those estimates. A target
and its draft model take turns on the same cores, so Engine.load opens both sessions with threads
that stop spinning when a run ends (session_options(idle_spin=False)).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .driver import make_rows

PRIOR = 0.5  # acceptance assumed for a row before any of its drafts are checked
# A draft model's acceptance is the pair's more than the text's: a row it joins starts from what its
# earlier rows kept (positions weighed by PAIR_KEEP a position), once PAIR_EVIDENCE positions are checked
PAIR_KEEP = 0.98
PAIR_EVIDENCE = 8.0
EMA = 0.3  # weight of the newest observation in the cost estimates
# per round of a source, the weight its earlier rounds keep in its wall time per emitted token, and
# the rounds it is given before that time is held against it (Speculator.realized)
ROUND_KEEP = 0.9
TRIAL_ROUNDS = 3
ROUTINE = 9  # tokens a row's draft-model catch-up call feeds in steady speculation, at most
KEEP = 0.7  # per round, the weight a row's earlier checked draft positions keep in its estimate
PSEUDO = 2.0  # checked positions the prior counts as
REMEASURE = 32  # rounds between the plain rounds that measure a one-token step
# a draft model's prefill position in its own one-token steps, until one is measured (SmolLM2 int4 at
# ~1,000 tokens: 1.1 ms a position, 13-17 ms a step)
PREFILL_POSITION = 0.08
GOOD_DRAFT = 0.9  # the acceptance a draft model has to reach to be worth a prefill (see _prefill_pays)
# how many times its cost a draft prefill must be expected to save: the estimate assumes a good draft
# and the cost model's round costs, both optimistic (a prefill that passed at 1x on an 882-token prompt
# halved that prompt's decode)
PAYBACK = 2.0
# prompt lookup matches the row's last n tokens, n_min <= n <= n_max, and copies what followed the
# occurrence with the longest match (the latest among equals). Up to 8 rather than 4: where a document
# repeats a phrase, the occurrence that also matches the tokens before it is more often the one the
# text goes on with (SmolLM2 int4, grounded prompts: drafts kept for 10% more tokens per unit of verify
# cost, measured offline against greedy output; benchmarks/README.md).
NGRAM_MAX = 8
NGRAM_MIN = 2
PREFILLING = "prefilling"  # a round's source while the draft prefilled new rows in it (not timed)


def expected_tokens(a: float, k: int) -> float:
    """Tokens one verify step emits on average with k drafts each accepted with probability a."""
    if k <= 0:
        return 1.0
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass
class Costs:
    """Measured seconds of a decode step by the number of tokens the widest row brought."""

    seconds: dict[int, float] = field(default_factory=dict)
    draft_step: float = 0.0  # seconds of one draft-model step (0 for n-gram drafts)
    # seconds a draft-model call spends per token it feeds beyond the first (a catch-up on the tokens
    # a lookup round emitted; 0: not measured)
    draft_token: float = 0.0
    draft_ratio: float = 0.0  # a draft step over a target step, timed at load (step_ratio; 0: unknown)
    draft_position: float = 0.0  # seconds of one position of the draft's prefill (0: not measured yet)
    # the draft model's decayed [kept, checked] draft positions over every row it drafted for
    # (ModelDrafter.prior)
    draft_kept: list[float] = field(default_factory=lambda: [0.0, 0.0])
    warm: set[int] = field(default_factory=set)  # widths whose first (warm-up) call has been seen

    def observe(self, width: int, secs: float) -> None:
        """A call's seconds. The first call of each width is not taken (a new input shape's one-off
        work): a cost is only re-measured by speculating at that width, so one high first reading
        could keep that draft length off (see also the retries in Speculator.choose)."""
        if width not in self.warm:
            self.warm.add(width)
            return
        old = self.seconds.get(width)
        self.seconds[width] = secs if old is None else (1 - EMA) * old + EMA * secs

    def observe_draft(self, secs: float) -> None:
        self.draft_step = secs if not self.draft_step else (1 - EMA) * self.draft_step + EMA * secs

    def observe_draft_call(self, width: int, secs: float) -> None:
        """A draft-model call that fed `width` tokens a row (width > 2: a catch-up after lookup
        rounds): its seconds beyond a draft step, per extra token."""
        if width > 2 and self.draft_step:
            tok = max(secs - self.draft_step, 0.0) / (width - 1)
            self.draft_token = tok if not self.draft_token else (1 - EMA) * self.draft_token + EMA * tok

    def lookup_value(self, worth: float, k: int, rows: int) -> float:
        """A lookup round's value (expected tokens per one-token step's time, `worth` as
        Speculator.best gives it for k drafts over `rows` rows) once it is also charged the draft
        model's later catch-up on the tokens it emits: a lookup round's drafts cost no model step
        now, but the draft model feeds them in a wider call when it next drafts."""
        base = self.seconds.get(1)
        if not base or not self.draft_token or k <= 0:
            return worth
        rel = self.relative(k, drafting=False)
        emitted = worth * rel / rows  # tokens a row is expected to emit this round
        return worth * rel / (rel + self.draft_token * emitted / base)

    def verify_seconds(self, width: int) -> float | None:
        """A call of `width` tokens' seconds: its own measurement, or a wider call's where that is less
        (a call that brings fewer tokens does no more work; each width is re-measured only when it is
        chosen, so one slow reading, kept, priced a draft length out for good: SmolLM2 int4 at ~1,000
        tokens kept 2.5 steps for a verify of 2 drafts, more than the 2.2 it measured for 3, and took
        one draft a round at 98% acceptance). None if neither is measured."""
        own = self.seconds.get(width)
        if own is None:
            return None  # unmeasured: relative's optimistic guess, so that it gets tried
        return min([own, *(secs for w, secs in self.seconds.items() if w > width)])

    def relative(self, k: int, drafting: bool = True) -> float:
        """Cost of a round with k drafts (verify, plus the draft model's steps when `drafting`) in
        one-token steps."""
        base = self.seconds.get(1)
        if k == 0:
            return 1.0
        verify = self.verify_seconds(k + 1)
        if base is None or verify is None:
            verify_rel = 1.0 + 0.05 * k  # optimistic until measured, so that every k gets tried
        else:
            verify_rel = verify / base
        draft_rel = (k * self.draft_step / base) if base and drafting else 0.0
        return verify_rel + draft_rel


class Speculator:
    """The policy shared by both drafters: per-row acceptance, choice of k, bookkeeping of rows."""

    def __init__(self, k_max: int = 8):
        if not 1 <= k_max <= 32:
            raise ValueError(f"draft length k_max must be in [1, 32], got {k_max}")
        self.k_max = k_max
        self.costs = Costs()
        self.evidence: list[list[float]] = []  # per row: decayed [kept, checked] draft positions
        self.drafted = self.accepted = self.rounds = self.speculated = 0
        self.grown = False  # whether the round after the latest join (which grows KV buffers) is past
        self.source: str | None = None  # what drafted this round (None: nothing; see observe_round)
        # whole rounds (drafting, verify, sampling) since rows last joined (a batch's rows and contexts
        # set their cost), by what drafted them (None: plain rounds): decayed [wall seconds, emitted
        # tokens], and how many rounds
        self.round_time: dict[str | None, list[float]] = {}
        self.timed = False  # whether this round's wall time counts (not the one after a join)
        self.exact_until: int | None = None  # a bundle's io.dynamic_rope_from (see limits)

    # rows join and leave as the driver's do
    def join(self, seqs: Sequence, rows) -> None:
        prior = self.prior()
        self.evidence += [[prior * PSEUDO, PSEUDO] for _ in seqs]
        self.grown = False
        self.round_time = {}

    def drop(self, row: int) -> None:
        self.evidence[row] = self.evidence[-1]
        self.evidence.pop()

    def free(self) -> None:
        self.evidence = []

    def prior(self) -> float:
        """The acceptance a row starts from (and drifts back to while it does not draft)."""
        return PRIOR

    @property
    def accept(self) -> list[float]:
        """Per row, the estimated chance that a drafted position is kept (see feedback)."""
        return [kept / checked for kept, checked in self.evidence]

    def choose(self, avail: Sequence[int]) -> int:
        """The draft length for this round, given how many tokens each row could draft at most. Every
        REMEASURE rounds (and first) a plain round keeps the one-token step's cost current: every
        other cost is relative to it."""
        if not self.measuring():
            return 0
        best_k, _, top_k = self.best(avail)
        return self.retry(best_k, top_k, avail)

    def realized(self, source: str) -> bool:
        """Whether rounds drafted by `source` have emitted tokens at least as fast as plain rounds, by
        their whole wall time (drafting, verify, sampling, bookkeeping: what the cost model's model
        calls leave out); true until plain rounds are measured and the source has had TRIAL_ROUNDS.
        ModelDrafter's draft model, whose rounds the cost model can misjudge (a draft step's calls
        beyond the one timed), drafts only where they have, and in retry rounds."""
        mine, plain = self.round_time.get(source), self.round_time.get(None)
        if mine is None or plain is None or mine[2] < TRIAL_ROUNDS:
            return True
        return mine[0] / mine[1] <= plain[0] / plain[1]

    @property
    def round_spt(self) -> dict[str | None, float]:
        """Wall seconds per emitted token by source (see realized)."""
        return {source: t[0] / t[1] for source, t in self.round_time.items()}

    def observe_round(self, secs: float, emitted: int) -> None:
        """A whole round's wall seconds and the tokens it emitted, under this round's source. A source's
        time is the ratio of its decayed sums, so that its first round weighs as much as the next: a
        moving average of per-round values started at the first, with that first round one whose drafts
        were soon rejected (60-110 ms for 1-2 tokens, plain rounds ~15 ms a token), kept SmolLM2's int4
        draft for its fp32 off for the rest of a generation (the retries, one in REMEASURE rounds, each
        moved it by a tenth)."""
        if not self.timed or not emitted or self.source == PREFILLING:
            return
        t = self.round_time.setdefault(self.source, [0.0, 0.0, 0])
        t[0] = ROUND_KEEP * t[0] + secs
        t[1] = ROUND_KEEP * t[1] + emitted
        t[2] += 1

    def measuring(self) -> bool:
        """False on the rounds that must be plain: before a one-token step's cost is known and every
        REMEASURE rounds."""
        return 1 in self.costs.seconds and self.rounds % REMEASURE != REMEASURE - 1

    def best(self, avail: Sequence[int], drafting: bool = True) -> tuple[int, float, int]:
        """(the k worth most, its expected tokens per one-token step's time, the k with the highest
        value even if plain decoding beats it). k = 0 is plain decoding, worth one token per row."""
        best_k, best = 0, float(len(avail))
        top_k, top = 0, 0.0
        for k in range(1, max(avail, default=0) + 1):
            gain = sum(expected_tokens(a, min(k, n)) for a, n in zip(self.accept, avail, strict=True))
            value = gain / self.costs.relative(k, drafting)
            if value > top:
                top_k, top = k, value
            if value > best * 1.02:
                best_k, best = k, value
        return best_k, best, top_k

    def retry(self, best_k: int, top_k: int, avail: Sequence[int]) -> int:
        """Now and then the most promising draft length even where plain decoding looks better:
        costs move with the context and a row's acceptance with its text, and estimates that only
        speculation updates go stale."""
        if self.rounds % REMEASURE == REMEASURE // 2:
            if best_k == 0:
                return top_k
            if best_k < max(avail, default=0):
                # the next longer draft too: its cost is otherwise re-measured only when chosen
                return best_k + 1
        return best_k

    def limit(self, seq) -> int:
        """Drafts a row may take: never past its token limit (the round emits at most k + 1)."""
        return max(0, min(self.k_max, seq.limit - len(seq.tokens) - 1))

    def limits(self, seqs: Sequence) -> list[int]:
        """Each row's limit, and with `exact_until` (dynamic NTK rope) only drafts that keep every row
        within it: past it a call rotates all its tokens with its longest row's scaling, which one token
        a call (plain decoding) does not, so then no row drafts."""
        out = [self.limit(s) for s in seqs]
        if self.exact_until is None or not seqs:
            return out
        held = [len(s.prompt) + len(s.tokens) for s in seqs]  # after this round's call, without drafts
        if max(held) > self.exact_until:
            return [0] * len(seqs)
        return [min(n, self.exact_until - h) for n, h in zip(out, held, strict=True)]

    def propose(self, seqs: Sequence, rows) -> list[list[int]]:
        raise NotImplementedError

    def feedback(self, row: int, drafted: int, accepted: int) -> None:
        """The row's estimate of the chance that a drafted position is kept given that those before
        it were (the `a` of expected_tokens). A verify checks positions up to the first rejection:
        `accepted` of them were kept, one was not (when accepted < drafted) and the rest were never
        checked. Counting those as failures too (accepted / drafted) underrates a row, the more the
        longer its drafts (96%-accepting drafts of 4 read as ~85%), and turned speculation off where
        it paid. The estimate is a ratio of decayed counts (kept / checked), which does not depend on
        the order of the events inside a round as a per-event moving average would."""
        ev = self.evidence[row]
        if drafted:
            _count_checked(ev, KEEP, drafted, accepted)
            self.drafted += drafted
            self.accepted += accepted
        else:  # drift back toward the prior, so a row that stopped drafting is tried again later
            ev[0] = 0.98 * ev[0] + 0.02 * self.prior() * PSEUDO
            ev[1] = 0.98 * ev[1] + 0.02 * PSEUDO

    def observe(self, width: int, secs: float) -> None:
        """A decode round's width and model seconds. The first round after rows join grows their
        prompt-sized KV buffers (a one-off copy), so it is not taken as a step's cost."""
        self.rounds += 1
        self.speculated += width > 1
        if self.grown:
            self.costs.observe(width, secs)
        self.timed = self.grown
        self.grown = True

    def stats(self) -> dict[str, float]:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
            "rounds": self.rounds,
            "speculated_rounds": self.speculated,
        }


def _count_checked(counts: list[float], keep: float, drafted: int, accepted: int) -> None:
    """Decayed [kept, checked] draft positions after a verify of `drafted`: `accepted` were kept, one
    was rejected when accepted < drafted, and the rest were never checked (Speculator.feedback)."""
    counts[0] = keep * counts[0] + accepted
    counts[1] = keep * counts[1] + accepted + (accepted < drafted)


def ngram_draft(context: np.ndarray, k: int, n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN) -> list[int]:
    """The up to k tokens that followed the latest earlier occurrence of the context's last n tokens
    (the longest n in [n_min, n_max] that matches); [] when none does. One pass over the context for
    the places of its last token, then backwards from those only (at 8,000 tokens 0.05 ms a row, where
    comparing every window for each n took 0.5)."""
    size = len(context)
    if size < 2:
        return []
    ends = np.flatnonzero(context[: size - 1] == context[-1])  # earlier places of the last token
    n = np.ones(len(ends), np.int64)  # how many tokens match, backwards from each
    alive = np.ones(len(ends), bool)
    for back in range(1, min(n_max, size - 1)):
        before = ends - back
        alive &= before >= 0
        alive[alive] = context[before[alive]] == context[size - 1 - back]
        n += alive
    if not len(ends) or n.max() < n_min:
        return []
    start = int(ends[np.flatnonzero(n == n.max())[-1]]) + 1
    return context[start : start + k].tolist()


class NgramDrafter(Speculator):
    """Prompt lookup: drafts copied from the row's own prompt and output."""

    def __init__(self, k_max: int = 8, n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN):
        super().__init__(k_max)
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram sizes must satisfy 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_max, self.n_min = n_max, n_min
        # per row, its prompt as an array, made at its first lookup (converting a list of 8,000 token
        # ids each round took 0.2 ms a row, four times the search)
        self.prompts: list[np.ndarray | None] = []

    def join(self, seqs: Sequence, rows) -> None:
        super().join(seqs, rows)
        self.prompts += [None] * len(seqs)

    def drop(self, row: int) -> None:
        super().drop(row)
        self.prompts[row] = self.prompts[-1]
        self.prompts.pop()

    def free(self) -> None:
        super().free()
        self.prompts = []

    def drafts(self, seqs: Sequence) -> list[list[int]]:
        """Each row's n-gram draft, as long as its limit allows ([] where nothing matches)."""
        out = []
        for row, (s, n) in enumerate(zip(seqs, self.limits(seqs), strict=True)):
            if not n:
                out.append([])
                continue
            if self.prompts[row] is None:
                self.prompts[row] = np.asarray(s.prompt, np.int64)
            context = np.concatenate([self.prompts[row], np.asarray(s.tokens, np.int64)])
            out.append(ngram_draft(context, n, self.n_max, self.n_min))
        return out

    def propose(self, seqs: Sequence, rows) -> list[list[int]]:
        drafts = self.drafts(seqs)
        k = self.choose([len(d) for d in drafts])
        self.source = "ngram" if k and any(drafts) else None
        return [d[:k] for d in drafts]


class ModelDrafter(Speculator):
    """A draft model (same tokenizer) proposes its greedy continuation. Its own driver holds each row's
    context; after verification its rows forget what the target did not keep.

    lookup: a round where prompt lookup (NgramDrafter's n-gram drafts, which cost no model step) is
    worth more than the draft model, by each source's own acceptance estimate and the measured costs,
    takes the lookup's drafts instead; the draft model catches up on those tokens when it next drafts,
    and that wider call is charged to the lookup (Costs.lookup_value).
    Text that copies its input (summaries, extraction) then speculates at the lookup's pace and the
    rest at the draft model's.

    The draft prefills joining rows once drafting with it is worth it and the prefill pays back over
    their remaining tokens (_prefill_pays), one chunk a round (lookup or plain rounds meanwhile), not
    when they join: the target's first token does not wait for a second prefill (it doubled the time
    to the first token), no round stalls for a whole one, and text the lookup drafts for throughout
    never pays for one."""

    def __init__(self, model, k_max: int = 4, chunk: int | None = 512, lookup: bool = True):
        super().__init__(k_max)
        self.model = model
        self.rows = make_rows(model, chunk)
        self.fed: list[list[int]] = []  # per row the draft holds: the tokens its cache holds
        self.held: list = []  # and its sequence
        self.unfed: list = []  # the rows it does not hold yet (their sequences): the batch's last ones
        self.job = None  # the draft's prefill of the first of them, one chunk a round
        self.job_contexts: list[list[int]] = []
        self.job_seconds = 0.0
        self.draft_grown = False
        self.lookup = NgramDrafter() if lookup else None  # its own acceptance estimates; our costs
        self.looked = False  # whether this round's drafts are the lookup's

    def join(self, seqs: Sequence, rows) -> None:
        super().join(seqs, rows)
        if self.lookup is not None:
            self.lookup.join(seqs, rows)
        self.unfed += list(seqs)

    def _feed_unfed(self) -> bool:
        """One chunk of the prefill of the rows the draft does not hold yet, with all their context but
        the last token (the next draft call feeds it). True once the draft holds every row."""
        if self.unfed:
            if self.job is None:
                self.job_contexts = [list(s.prompt) + list(s.tokens[:-1]) for s in self.unfed]
                self.job = self.rows.start(self.job_contexts)
                self.job_seconds = 0.0
            t0 = time.perf_counter()
            done = self.job.step() is not None
            self.job_seconds += time.perf_counter() - t0
            if done:
                self.costs.draft_position = self.job_seconds / sum(len(c) for c in self.job_contexts)
                self.rows.join(self.job)
                n = len(self.job_contexts)
                self.fed += self.job_contexts
                self.held += self.unfed[:n]
                del self.unfed[:n]
                self.job = None
                self.draft_grown = False
        return not self.unfed

    def _prefill_pays(self) -> bool:
        """Whether a good draft (GOOD_DRAFT of its tokens kept) would save more over the new rows'
        remaining tokens than prefilling them costs: a long prompt with a few tokens to go never pays
        back its draft prefill, a short one is worth the try (the rows' own acceptance then decides).
        Costs in the target's one-token steps: the draft's step as measured, else as timed at load."""
        if self.job is not None or not self.unfed:
            return True  # nothing new to start
        c = self.costs
        base = c.seconds[1]
        step = c.draft_step / base if c.draft_step else c.draft_ratio
        value = max(
            expected_tokens(GOOD_DRAFT, k) / (c.relative(k, drafting=False) + k * step)
            for k in range(1, self.k_max + 1)
        )
        remaining = max(s.limit - len(s.tokens) for s in self.unfed)
        position = c.draft_position / base if c.draft_position else PREFILL_POSITION * (step or 0.5)
        cost = position * sum(len(s.prompt) + len(s.tokens) for s in self.unfed)
        return (1.0 - 1.0 / value) * remaining > PAYBACK * cost

    def _drop_job(self) -> None:
        if self.job is not None:
            self.job.free()
            self.job = None

    def drop(self, row: int) -> None:
        super().drop(row)
        if self.lookup is not None:
            self.lookup.drop(row)
        held = len(self.fed)
        if row >= held:  # one the draft does not hold; the batch's last row, moving in, neither
            if self.job is not None and row - held < len(self.job_contexts):
                self._drop_job()  # it was being prefilled: start again without it
            self.unfed[row - held] = self.unfed[-1]
            self.unfed.pop()
            return
        if not self.unfed:  # the batch's last row, moving into this one, is the draft's last too
            self.rows.drop(row)
            for rows in (self.fed, self.held):
                rows[row] = rows[-1]
                rows.pop()
            return
        # the batch's last row, one the draft does not hold, moves into this one: the draft lets go of
        # this row and those after it (last first, so nothing moves), which rejoin the rows it does not
        # hold, in the batch's order
        self._drop_job()
        for r in reversed(range(row, held)):
            self.rows.drop(r)
        moved = self.unfed.pop()
        self.unfed = [moved, *self.held[row + 1 :], *self.unfed]
        del self.fed[row:], self.held[row:]

    def free(self) -> None:
        super().free()
        if self.lookup is not None:
            self.lookup.free()
        self._drop_job()
        self.rows.free()
        self.fed, self.held, self.unfed = [], [], []

    def feedback(self, row: int, drafted: int, accepted: int) -> None:
        """To whichever source drafted; the other's estimate drifts back toward the prior, as a row's
        does in plain rounds (else one unlucky lookup draft kept the lookup off for the rest of a
        generation)."""
        if not self.looked:
            super().feedback(row, drafted, accepted)
            if drafted:
                _count_checked(self.costs.draft_kept, PAIR_KEEP**drafted, drafted, accepted)
            if self.lookup is not None:
                self.lookup.feedback(row, 0, 0)
            return
        self.lookup.feedback(row, drafted, accepted)
        super().feedback(row, 0, 0)
        self.drafted += drafted
        self.accepted += accepted

    def prior(self) -> float:
        """What the draft model's earlier rows kept, once enough is checked: with the fixed prior a new
        row started where plain decoding looked better (SmolLM2's int4 draft for its fp32, kept at
        ~90% on open prompts, drafted in only the retry rounds of some generations)."""
        kept, checked = self.costs.draft_kept
        return kept / checked if checked >= PAIR_EVIDENCE else PRIOR

    def stats(self) -> dict[str, float]:
        out = super().stats()
        if self.lookup is not None:
            out.update(lookup_drafted=self.lookup.drafted, lookup_accepted=self.lookup.accepted)
        return out

    def propose(self, seqs: Sequence, rows) -> list[list[int]]:
        limits = self.limits(seqs)
        contexts = [s.prompt + s.tokens for s in seqs]
        for b, fed in enumerate(self.fed):  # forget what the target replaced (rows the draft holds)
            keep = _common(fed, contexts[b])
            if keep < len(fed):
                self.rows.rollback(b, len(fed) - keep)
                del fed[keep:]
        self.looked, self.source = False, None
        if not self.measuring():
            return [[] for _ in seqs]
        k, value, top = self.best(limits)
        if not self.realized("model"):
            k, value = 0, float(len(seqs))
        k = self.retry(k, top, limits)
        # the draft drafts once it holds every row; new rows are prefilled a chunk a round while it is
        # worth drafting and the prefill pays back; meanwhile a round is the lookup's or plain
        ready = not self.unfed
        if not ready and k > 0 and self._prefill_pays():
            self.source = PREFILLING  # this round's time holds a chunk of the draft's prefill
            ready = self._feed_unfed()
        if not ready:
            k, value = 0, float(len(seqs))
        look = self.lookup
        if look is not None:
            look.costs = self.costs  # verify costs are the target's (Engine replaces ours after __init__)
            found = look.drafts(seqs)
            if any(found):
                k_look, worth, _ = look.best([len(d) for d in found], drafting=False)
                if ready:  # the draft model will feed this round's tokens later
                    worth = self.costs.lookup_value(worth, k_look, len(seqs))
                if k_look and worth >= value:
                    self.looked, self.source = True, self.source or "lookup"
                    return [d[:k_look] for d in found]
        if k == 0 or (self.grown and None not in self.round_time):
            return [[] for _ in seqs]  # (a plain round's whole time measured first, for realized)
        self.source = self.source or "model"
        # catch up on the tokens the draft has not seen (at least the last sampled one), then k - 1
        # single steps; the kth draft token is never fed (the target may replace it anyway)
        pending = [ctx[len(fed) :] for ctx, fed in zip(contexts, self.fed, strict=True)]
        drafts: list[list[int]] = [[] for _ in seqs]
        tokens = pending
        # a draft step's seconds from the calls that fed at most 2 tokens a row (the catch-up after the
        # target kept a whole draft, then single steps); a wider catch-up, after lookup rounds (up to
        # ROUTINE tokens), is the lookup's cost (Costs.lookup_value): counted as the model's it priced
        # model rounds up until speculation with a 97%-accepting draft turned itself off. One after a
        # stretch of plain rounds is a one-off.
        steps = []
        for i in range(k):
            t0 = time.perf_counter()
            logits = self.rows.decode(tokens)  # (batch, K, vocab)
            width, secs = max(len(t) for t in tokens), time.perf_counter() - t0
            if width <= 2:
                steps.append(secs)
            elif width <= ROUTINE and self.draft_grown:
                self.costs.observe_draft_call(width, secs)
            last = np.array([len(t) - 1 for t in tokens])
            nxt = logits[np.arange(len(tokens)), last].argmax(-1)
            for b, t in enumerate(tokens):
                self.fed[b].extend(t)
                if i < limits[b]:
                    drafts[b].append(int(nxt[b]))
            tokens = [[int(t)] for t in nxt]
        if self.draft_grown and steps:  # not the draft rows' first steps after they joined (buffer growth)
            self.costs.observe_draft(sum(steps) / len(steps))
        self.draft_grown = True
        return [d[: min(k, n)] for d, n in zip(drafts, limits, strict=True)]


def _probe(model, n: int) -> list[int]:
    """n token ids spread over the vocabulary: input for the load-time probes below."""
    vocab = model.facts.vocab_size
    return [int(t) for t in np.linspace(3, vocab - 3, n).astype(np.int64) % vocab]


def _primed(model, prefix: list[int]):
    """A fresh driver holding one row, prefilled with `prefix` (the caller frees it)."""
    rows = make_rows(model, None)
    job = rows.start([prefix])
    job.run()
    rows.join(job)
    return rows


def step_ratio(target, draft, probe: int = 16, steps: int = 5) -> float:
    """A draft model's one-token decode step over the target's (medians of `steps`, after a probe-token
    prompt): what a draft step costs before the draft has run one in a generation."""
    ids = _probe(target, probe + steps + 1)

    def step(model) -> float:
        rows = _primed(model, ids[:probe])
        try:
            times = []
            for t in ids[probe:]:
                t0 = time.perf_counter()
                rows.decode([[t]])
                times.append(time.perf_counter() - t0)
        finally:
            rows.free()
        return float(np.median(times[1:]))  # the first grows the buffer

    return step(draft) / step(target)


def verify_gap(model, probe: int = 24, width: int = 8) -> float:
    """How differently the model computes several tokens in one call from one token a call: max |Δ
    logit| over `width` positions after a `probe`-token prefix (token ids spread over the vocabulary).
    Float noise on float graphs; tenths of a logit on a quantized graph with a float32 cache, whose
    kernels quantize their activations to int8 and so turn attention's last-bit differences between a
    several-token call and single tokens into whole rounding steps (MatMulNBits itself computes a row
    alike in any call); 0 with an int8 cache, whose attention computes each query alike. Where the top
    two tokens are closer than the gap, greedy output under speculation can differ from plain decoding."""
    ids = _probe(model, probe + width)
    prefix, more = ids[:probe], ids[probe:]
    rows = _primed(model, prefix)
    try:
        single = np.stack([rows.decode([[t]])[0, 0] for t in more])
    finally:
        rows.free()
    rows = _primed(model, prefix)
    try:
        multi = rows.decode([more])[0]
    finally:
        rows.free()
    return float(np.abs(single - multi).max())


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n
