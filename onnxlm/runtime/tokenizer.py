"""Tokenizer, chat template and streaming detokenizer, driven by the bundle's tokenizer.json and manifest.

The chat template is untrusted code from a model repository: it renders in a sandbox with a time
budget and an output cap (see chat_template.py).

Thread-safe: `encode` of a long text releases the GIL (other threads, an event loop among them, keep
running while it works), and nothing here mutates shared state after construction but the compiled
template, which is built once and then only read.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from ..bundle import TOKENIZER, BundleError, Manifest

if TYPE_CHECKING:
    import jinja2

__all__ = ["Detokenizer", "Tokenizer"]


def __getattr__(name: str):
    """The chat-template names re-exported here, imported when first asked for (they need jinja2)."""
    if name in ("ChatTemplateError", "compile_chat_template", "render_chat_template"):
        from . import chat_template

        return getattr(chat_template, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _mentions(component: Any, kind: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence of them) has one of type `kind`."""
    if isinstance(component, dict):
        return component.get("type") == kind or any(_mentions(v, kind) for v in component.values())
    if isinstance(component, list):
        return any(_mentions(v, kind) for v in component)
    return False


# Past this many characters encode goes through encode_batch_fast, which releases the GIL (plain encode
# holds it: a 4 MB prompt froze every other thread for 6 s) and skips the offsets nobody reads.
GIL_FREE_CHARS = 4096


def check_text(text: str, what: str = "the text") -> None:
    """A ValueError naming the first character that is not valid Unicode (a lone surrogate: what Python
    makes of invalid UTF-8 on the command line, or a JSON "\\ud800" escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid Unicode: character {e.start} is a lone surrogate "
            f"(U+{ord(text[e.start]):04X}; invalid UTF-8 input?)"
        ) from None


class Tokenizer:
    """encode / decode / chat template for one bundle."""

    def __init__(self, tok: HFTokenizer, manifest: Manifest):
        self.tok = tok
        self.manifest = manifest
        facts = manifest.model
        self.bos_token_id = facts.bos_token_id
        self.eos_token_ids = list(facts.eos_token_ids)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = self._token(self.bos_token_id)
        self.eos_token = self._token(self.eos_token_ids[0] if self.eos_token_ids else None)
        # prepend BOS ourselves only when the manifest asks and the tokenizer's post-processor does not
        with_special = tok.encode("a", add_special_tokens=True).ids
        plain = tok.encode("a", add_special_tokens=False).ids
        adds_bos = len(with_special) > len(plain) and with_special[0] == self.bos_token_id
        self.prepend_bos = bool(facts.add_bos_token and self.bos_token_id is not None and not adds_bos)
        self._template: jinja2.Template | None = None
        self._bytes: list[bytes] | None = None
        self._rules: tuple | None = None
        self._template_lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, manifest: Manifest) -> Tokenizer:
        path = Path(bundle_dir) / TOKENIZER
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BundleError(f"{path}: not a usable tokenizer ({first})") from None
        return cls(tok, manifest)

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, BOS first when the model expects one."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        check_text(text)
        if len(text) > GIL_FREE_CHARS:
            ids = self.tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.prepend_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for on its own: the pieces of a character split across tokens are
        the character's UTF-8 bytes, split where the tokens split it (decode would give U+FFFD)."""
        if not 0 <= token_id < self.vocab_size:
            return b""
        if self._bytes is not None:
            return self._bytes[token_id]
        return self._piece_bytes(token_id)  # one token: no need to build the whole table (~0.1 s)

    def token_bytes_table(self) -> list[bytes]:
        """token_bytes of every id, built once."""
        if self._bytes is None:
            self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        return self._bytes

    def _piece_bytes(self, i: int) -> bytes:
        """Byte-level BPE characters map back to their bytes, SentencePiece byte pieces (<0x..>) to their
        byte and '▁' to a space; added tokens are their text."""
        byte_level, byte_fallback, alphabet, added = self._byte_rules()
        if i in added:
            return added[i].encode()
        piece = self.tok.id_to_token(i)
        if piece is None:
            return b""
        if byte_fallback and (m := _BYTE_TOKEN.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        if byte_level and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        return piece.replace("\u2581", " ").encode()

    def _byte_rules(self) -> tuple[bool, bool, dict[str, int], dict[int, str]]:
        """What token_bytes needs of the tokenizer's pipeline, read from its components' own JSON (the
        whole tokenizer's JSON takes ~0.1 s to write and parse)."""
        if self._rules is None:
            parts = [self.tok.pre_tokenizer, self.tok.decoder]
            spec = [json.loads(c.__getstate__()) if c is not None else None for c in parts]
            byte_level = any(_mentions(c, "ByteLevel") for c in spec)
            fallback = getattr(self.tok.model, "byte_fallback", None)
            if fallback is None:  # not exposed by every model type (Unigram): its own JSON says it
                fallback = json.loads(self.tok.model.__getstate__()).get("byte_fallback")
            byte_fallback = bool(fallback) or _mentions(spec[1], "ByteFallback")
            added = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()}
            self._rules = (byte_level, byte_fallback, _byte_level_alphabet(), added)
        return self._rules

    def special_token_ids(self) -> list[int]:
        return sorted(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    # --- chat ----------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.manifest.chat_template)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render OpenAI-style messages to the prompt text (special tokens included as text)."""
        # jinja2 (~7 MB resident) is loaded by the first chat, not by every process that generates
        from .chat_template import ChatTemplateError, compile_chat_template, render_chat_template

        if not self.manifest.chat_template:
            raise ChatTemplateError(
                "this bundle has no chat template (the manifest's chat_template is empty); "
                "use generate() with a plain prompt instead"
            )
        with self._template_lock:
            if self._template is None:
                self._template = compile_chat_template(self.manifest.chat_template)
        return render_chat_template(
            self._template,
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )


def _incomplete_tail(data: bytes) -> bool:
    """Whether `data` ends in the first bytes of a UTF-8 character (more bytes would complete it)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    return bool(decoder.getstate()[0])


class Detokenizer:
    """Turn a growing list of token ids into text deltas that are always complete characters.

    Byte-level BPE can split one character across tokens, and SentencePiece-style decoders drop the
    leading space of the first token they see; tokenizers' DecodeStream handles both (it decodes a small
    anchor window with and without the new tokens and emits the difference, holding back anything that
    ends in U+FFFD, an unfinished UTF-8 sequence). DecodeStream has no end: `flush()` emits what it
    still holds, from the same window, which is tracked here. The concatenated deltas equal
    `decode(all ids)` once `flush()` has run (less a trailing U+FFFD for a character cut off by the end).
    """

    def __init__(self, tokenizer: Tokenizer | HFTokenizer, skip_special_tokens: bool = True):
        self._decode_fn = tokenizer.decode
        self._tokenizer = tokenizer
        self._hf = getattr(tokenizer, "tok", tokenizer)  # DecodeStream steps the tokenizers object
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: tokens before it are settled and emitted
        self.read = 0  # tokens before it have been emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decode_fn(list(ids), skip_special_tokens=self.skip)

    def _cut_character(self, ids: Sequence[int]) -> bool:
        token_bytes = getattr(self._tokenizer, "token_bytes", None)
        if token_bytes is None:
            return False
        skipped = set(self._tokenizer.special_token_ids()) if self.skip else set()
        return _incomplete_tail(b"".join(token_bytes(i) for i in ids if i not in skipped))

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append token(s); return the new complete text (possibly "")."""
        new = [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        if not new:
            return ""
        self.ids.extend(new)
        delta = self._step(new)
        if not delta:  # None: an unfinished character (or nothing visible) is held back
            return ""
        self.prefix, self.read = self.read, len(self.ids)  # DecodeStream's window moves the same way
        self.text += delta
        return delta

    def _step(self, new: list[int]) -> str | None:
        if self._stream is not None:
            try:
                return self._stream.step(self._hf, new if len(new) > 1 else new[0])
            except Exception:  # a decoder whose longer window does not extend the shorter one's text
                self._stream = None  # (DecodeStream's InvalidPrefix): the same window, by hand
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            return new_text[len(prefix_text) :]
        return None

    def flush(self) -> str:
        """Emit whatever is held back. A character cut off by the end (its first bytes only) is dropped,
        not shown as U+FFFD: the text never carries a replacement character the tokens did not make."""
        if self.read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        delta = new_text[len(prefix_text) :]
        if delta.endswith(REPLACEMENT) and self._cut_character(self.ids[self.read :]):
            delta = delta[:-1]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta
