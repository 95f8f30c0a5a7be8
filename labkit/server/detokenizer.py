"""Tokens to text while they stream: each new token's text, once it is whole, and the ``stop`` strings.

A byte-level BPE token can end in the middle of a UTF-8 character, and a SentencePiece token's leading
space only shows after the token before it, so the text of a token depends on its neighbours. Decoding
everything again each token would be right but quadratic; decoding each token alone would be wrong.
The usual streaming detokenizer (Hugging Face's TextStreamer, TGI, vLLM) decodes a short window::

    tokens   ... | prefix_offset ........ read_offset | new ... |
    prefix = decode(tokens[prefix_offset:read_offset])   text already sent, as the window sees it
    full   = decode(tokens[prefix_offset:])
    delta  = full[len(prefix):]      held back while full ends in U+FFFD (half a character)

Stop strings: the text is searched for each of ``stop``; on a match the answer ends just before it
(finish_reason "stop", the engine's request is aborted). While the answer runs, the last
``len(longest stop) - 1`` characters are held back, so a stop string split across two tokens is never
half-sent.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # all text decoded so far (stop string and after removed once stopped)
        self.sent = 0  # characters of self.text handed out
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text that may be sent now (possibly "")."""
        if self.stopped:
            return ""
        for t in token_ids:
            self.token_ids.append(t)
            prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset])
            full = self.tokenizer.decode(self.token_ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            if self.stop and self._match_stop():
                return self._take(len(self.text))
        return self._take(len(self.text) - self.hold)

    def _match_stop(self) -> bool:
        start = max(0, self.sent - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return bool(hits)

    def flush(self) -> str:
        """At the end of the answer: everything not sent yet."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
