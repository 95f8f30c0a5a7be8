"""A guard model: a small LLM prompted as a classifier, on its own engine instance.

Llama Guard's recipe (Inan et al., 2023, arXiv 2312.06674): put the policy and the user's message in a
prompt that ends where the answer begins, run one forward, and read the next-token logits of "safe"
and "unsafe". No token is generated; the score is

    p_unsafe = softmax([logit(safe), logit(unsafe)])[1]        (first token of each label)

The guard runs on its own :class:`labkit.engine.LLMEngine`, with its own KV pool, batching its
requests like any other engine. :class:`GuardRunner` is the engine's ModelRunner with one change: where
the runner would sample, it keeps the two label logits of each row. Any ``(model, tokenizer)`` works:
the lab's guard is SmolLM2-135M-Instruct
(``labkit.checkpoint.load_pretrained("models/SmolLM2-135M-Instruct.Q4_1.gguf")`` once the GGUF loader has
landed); the tests use the shipped Austen model, whose verdicts mean nothing but whose logits can be checked.
"""
from __future__ import annotations

import dataclasses
import pathlib

import torch

from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.engine.model_runner import ModelRunner

GUARD_MODEL_PATH = pathlib.Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

GUARD_TEMPLATE = (
    "<|im_start|>system\nYou are a safety classifier for a library's question service about Jane Austen's "
    "novels. A message is unsafe if it asks for violence, weapons, self-harm, crime or hateful content; "
    "otherwise it is safe. Reply with one word: safe or unsafe.<|im_end|>\n"
    "<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")


@dataclasses.dataclass(frozen=True)
class GuardVerdict:
    message: str
    logit_safe: float
    logit_unsafe: float

    @property
    def p_unsafe(self) -> float:
        return float(torch.softmax(torch.tensor([self.logit_safe, self.logit_unsafe]), 0)[1])

    def is_safe(self, threshold: float = 0.5) -> bool:
        return self.p_unsafe < threshold


class GuardRunner(ModelRunner):
    """The engine's runner, except that a sampling row records (logit of label 0, logit of label 1) and
    returns the likelier label's token (the request has max_tokens=1, so that ends it)."""

    def __init__(self, model, config: EngineConfig, max_model_len: int, label_ids: tuple[int, int]):
        super().__init__(model, config, max_model_len)
        self.label_ids = label_ids
        self.scores: dict = {}

    def _sample(self, logits: torch.Tensor, seqs) -> dict:
        pair = logits[:, list(self.label_ids)].float().cpu()  # (rows, 2): one copy for the whole step
        tokens = {}
        for i, seq in enumerate(seqs):
            if torch.isnan(pair[i]).any():
                raise FloatingPointError(f"guard request {seq.seq_id}: NaN logits; run the guard in float32")
            self.scores[seq.seq_id] = (float(pair[i, 0]), float(pair[i, 1]))
            tokens[seq.seq_id] = self.label_ids[int(pair[i, 1] > pair[i, 0])]
        return tokens


def label_token_ids(tokenizer, labels: tuple[str, str]) -> tuple[int, int]:
    """First token of each label (with the leading space a label has after "Answer:"-style prompts if
    the tokenizer splits it that way); the two must differ."""
    ids = []
    for label in labels:
        toks = tokenizer.encode(label)
        bos = getattr(tokenizer, "bos_token_id", None)
        toks = toks[1:] if bos is not None and toks and toks[0] == bos else toks
        if not toks:
            raise ValueError(f"the tokenizer encodes the guard label {label!r} to no tokens")
        ids.append(toks[0])
    if ids[0] == ids[1]:
        raise ValueError(f"the guard labels {labels} start with the same token {ids[0]}; choose labels whose first "
                         "tokens differ")
    return ids[0], ids[1]


class Guard:
    """``Guard(model, tokenizer).classify(["message", ...]) -> [GuardVerdict, ...]``, batched on its own engine."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, template: str = GUARD_TEMPLATE,
                 labels: tuple[str, str] = ("safe", "unsafe")):
        if "{message}" not in template:
            raise ValueError("the guard template needs a {message} placeholder for the user's message")
        self.model, self.tokenizer, self.template, self.labels = model, tokenizer, template, labels
        self.label_ids = label_token_ids(tokenizer, labels)
        config = EngineConfig(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=1024) if config is None else config
        max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.runner = GuardRunner(model, config, max_model_len, self.label_ids)
        self.engine = LLMEngine(model, config, runner=self.runner, model_config=model.config, clock="wall")

    def prompt_ids(self, message: str) -> list[int]:
        ids = self.tokenizer.encode(self.template.format(message=message))
        limit = self.engine.max_model_len - 1
        if len(ids) > limit:
            raise ValueError(f"the guard prompt is {len(ids)} tokens, more than the guard's max_model_len - 1 = "
                             f"{limit}; "
                             "shorten the message")
        return ids

    def submit(self, message: str, request_id=None):
        """Queue one message on the guard's engine; its verdict is ready once the sequence finishes."""
        return self.engine.add_request(self.prompt_ids(message), SamplingParams(max_tokens=1, ignore_eos=True),
                                       request_id=request_id)

    def verdict(self, seq, message: str) -> GuardVerdict:
        if not seq.is_finished:
            raise RuntimeError(f"guard request {seq.seq_id} has not run yet; step the guard's engine first")
        s, u = self.runner.scores.pop(seq.seq_id)
        return GuardVerdict(message, s, u)

    def classify(self, messages: list[str]) -> list[GuardVerdict]:
        seqs = [self.submit(m) for m in messages]
        while any(not s.is_finished for s in seqs):
            self.engine.step()
        return [self.verdict(s, m) for s, m in zip(seqs, messages)]
