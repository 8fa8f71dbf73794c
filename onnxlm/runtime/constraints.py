"""Constrained decoding through llguidance: a JSON schema, a regular expression or a Lark grammar limits
each step's next token to those that keep the output inside the language.

    grammar = compile_grammar(json_schema={"type": "object", ...})   # validated once per request
    seq.constraint = Constraint(grammar, engine.tokenizer, eos_id)    # one matcher per sequence
    fill_masks(seqs)                  # every constrained row's mask for this step, one batched call
    logits = seq.constraint.apply(logits)                             # disallowed tokens -> -inf
    seq.constraint.advance(token)

llguidance reads the bundle's tokenizer.json itself (its LLTokenizer, built once per tokenizer and
cached), computes a bitmask of 32 tokens per int32 word in Rust, and fills the rows of a whole batch in
parallel (LLExecutor). Rows without a constraint are skipped and sample as before.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger("onnxlm.constraints")


def _llg():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the numpy mask helpers)
    except ImportError as e:  # pragma: no cover - a base dependency, missing only in a broken install
        raise ImportError(
            "constrained decoding (json_schema=, regex=, grammar=, tools) needs llguidance: "
            "pip install 'llguidance>=1.3,<1.7'"
        ) from e
    return llguidance


def compile_grammar(
    json_schema: dict | str | None = None, regex: str | None = None, grammar: str | None = None
) -> str | None:
    """One llguidance grammar from at most one of a JSON schema (a dict, or its JSON text), a regular
    expression or a Lark grammar; None when none is given. Raises ValueError naming what is wrong."""
    given = [
        n for n, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None
    ]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"give at most one of json_schema, regex and grammar, got {', '.join(given)}")
    M = _llg().LLMatcher
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(json_schema, (dict, bool)):
            raise ValueError(f"json_schema must be a JSON object, got {type(json_schema).__name__}")
        out = M.grammar_from_json_schema(json.dumps(json_schema), defaults=JSON_OPTIONS)
        what = "json_schema"
    elif regex is not None:
        if not isinstance(regex, str):
            raise ValueError(f"regex must be a string, got {type(regex).__name__}")
        out, what = M.grammar_from_regex(regex), "regex"
    else:
        if not isinstance(grammar, str):
            raise ValueError(f"grammar must be a Lark grammar (a string), got {type(grammar).__name__}")
        out, what = M.grammar_from_lark(grammar), "grammar"
    error = M.validate_grammar(out)
    if error:
        raise ValueError(f"{what}: {error.strip().splitlines()[0]}")
    return out


# compact JSON with one space after ':' and ',' (as json.dumps writes it); no free whitespace, which a
# small model would otherwise fill with newlines until max_tokens
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# --- the tokenizer llguidance needs, once per onnxlm Tokenizer --------------------------------------------
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer, vocab_size: int, eos_id: int | None):
    """llguidance's view of an onnxlm Tokenizer, padded to the model's vocabulary (logits may be wider
    than the tokenizer). Built once per tokenizer (~0.5 s on 49k tokens) from the tokenizer's own token
    bytes: llguidance's reading of tokenizer.json misses byte-level decoders wrapped in a Sequence."""
    key = (vocab_size, eos_id)
    with _LOCK:
        cached = _TOKENIZERS.setdefault(tokenizer, {})
        if key not in cached:
            llg = _llg()
            vocabulary = _Vocabulary(tokenizer, vocab_size, eos_id)
            cached[key] = llg.LLTokenizer(
                llg.TokenizerWrapper(vocabulary), n_vocab=vocab_size, eos_token=eos_id
            )
        return cached[key]


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: token bytes (special tokens marked by a 0xFF first
    byte, as llguidance expects), the special ids, and an encode function."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int | None):
        special = set(tokenizer.special_token_ids())
        table = tokenizer.token_bytes_table()
        self.tokens = [b"\xff" + t if i in special else t for i, t in enumerate(table)]
        self.tokens += [b""] * (vocab_size - len(self.tokens))
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_token_id
        self._encode = tokenizer.tok.encode

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes: say str only
            raise TypeError("text only")
        return self._encode(text, add_special_tokens=False).ids


class Constraint:
    """One sequence's grammar state: a matcher, and this step's mask once filled. `eos_ids`: the model's
    end tokens; llguidance knows the first, the others are allowed (and consumed as it) alongside."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int, eos_ids: int | Sequence[int] | None):
        llg = _llg()
        ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        self.eos, self.other_eos = (ids[0] if ids else None), np.array(ids[1:], dtype=np.int64)
        self.vocab_size = vocab_size
        self.matcher = llg.LLMatcher(ll_tokenizer(tokenizer, vocab_size, self.eos), grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.mask: np.ndarray | None = None  # (words,) int32, bit t of word t//32 = token t allowed

    @property
    def done(self) -> bool:
        """Nothing more may follow (the grammar is complete and admits no longer text)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    def fill(self) -> None:
        """This step's mask for this sequence alone (fill_masks does a whole batch at once)."""
        self.mask = _llg().numpy.allocate_token_bitmask(1, self.vocab_size)[0]
        _llg().numpy.fill_next_token_bitmask(self.matcher, self.mask[None, :], 0)

    def allowed(self, vocab: int) -> np.ndarray:
        """(vocab,) bool: the tokens the grammar allows next."""
        if self.mask is None:
            self.fill()
        allowed = np.unpackbits(self.mask.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        if self.eos is not None and len(self.other_eos) and allowed[self.eos]:
            allowed[self.other_eos[self.other_eos < vocab]] = True
        return allowed

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """logits (vocab,) with every token the grammar forbids at -inf (a new float32 array), through
        llguidance's native bitmask kernel (a numpy unpack and select cost ~0.3 ms a row here)."""
        if self.mask is None:
            self.fill()
        mask = self.mask
        if (
            self.eos is not None
            and len(self.other_eos)
            and (int(mask[self.eos // 32]) >> (self.eos % 32)) & 1
        ):
            mask = mask.copy().view(np.uint32)  # the model's other end tokens go where its first may
            for t in self.other_eos[self.other_eos < 32 * len(mask)]:
                mask[t // 32] |= np.uint32(1 << int(t % 32))
            mask = mask.view(np.int32)
        out = np.array(logits, dtype=np.float32)  # (vocab,), a copy
        _llg().numpy.apply_token_bitmask_inplace(out, mask)
        return out

    def advance(self, token: int) -> bool:
        """Move past a sampled token; False (and an error state) when the grammar did not allow it."""
        self.mask = None
        if token in self.other_eos:
            token = self.eos
        return bool(self.matcher.consume_token(int(token)))


_EXECUTOR = None


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llg().LLExecutor()
    return _EXECUTOR


def fill_masks(seqs: Sequence[Any]) -> None:
    """Fill this step's mask of every sequence that has a `constraint`, in one parallel llguidance call;
    sequences without one (or already finished) are skipped."""
    rows = [
        s.constraint for s in seqs if getattr(s, "constraint", None) is not None and s.finish_reason is None
    ]
    if not rows:
        return
    llg = _llg()
    masks = llg.numpy.allocate_token_bitmask(len(rows), rows[0].vocab_size)  # (rows, words)
    if len(rows) == 1:
        llg.numpy.fill_next_token_bitmask(rows[0].matcher, masks, 0)
    else:
        llg.numpy.fill_next_token_bitmask_par(
            _executor(), [(c.matcher, i) for i, c in enumerate(rows)], masks
        )
    for i, c in enumerate(rows):
        c.mask = masks[i]


def to_lark(grammar: str) -> str:
    """A grammar in Lark syntax, converted from llama.cpp's GBNF when it is GBNF (llguidance's converter)."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(grammar)
    except Exception as e:  # the converter raises assorted errors on bad GBNF
        raise ValueError(f"not a valid Lark or GBNF grammar: {e}") from None
