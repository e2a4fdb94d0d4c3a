"""Tokenization of prompts and answers for a causal LM: padded batches with answer-only labels.

One added special token (not a word pieced together from sub-words) makes placeholder positions exact:
``input_ids == item_token_id``. :class:`ItemTokenizer` tokenizes (prompt, answer) pairs with the backbone's chat
template when it has one and labels only the answer tokens; :class:`EncodedBatch` is what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from recadapt.llm.prompts import ITEM_TOKEN, Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value torch's cross-entropy (and transformers' LM loss) skips

PaddingSide = Literal["left", "right"]


def add_item_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> int:
    """Add :data:`ITEM_TOKEN` as a special token (idempotent) and return its id; with ``model``, grow its input
    embeddings so the id is valid. Never shrinks: some models carry more embedding rows than tokens."""
    from tokenizers import AddedToken

    tokenizer.add_tokens(
        [AddedToken(ITEM_TOKEN, special=True, normalized=False, lstrip=False, rstrip=False)],
        special_tokens=True,
    )
    token_id = tokenizer.convert_tokens_to_ids(ITEM_TOKEN)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise RuntimeError(f"the tokenizer did not register {ITEM_TOKEN}")
    if model is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        if token_id >= rows:
            # mean_resizing: the new row starts at the mean embedding, so an un-injected token is not an outlier
            model.resize_token_embeddings(token_id + 1, mean_resizing=True)
    return token_id


@dataclass(frozen=True)
class Tokenized:
    """One sample's token ids, unpadded: ``head`` (the prompt), ``tail`` (the answer and its end of turn; empty
    for a prompt alone) and the item id of each placeholder, in order."""

    head: list[int]
    tail: list[int]
    item_ids: list[int]

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)


@dataclass
class EncodedBatch:
    """A padded batch for a causal LM.

    ``labels`` is -100 except on answer tokens (None for generation prompts). ``item_positions`` is
    LongTensor[N, 2] of (row, position) of every placeholder token, row-major and left to right, and ``item_ids``
    LongTensor[N] the item each stands for: the arguments :func:`recadapt.llm.injection.inject_item_embeddings`
    takes.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor | None
    item_positions: Tensor
    item_ids: Tensor
    padding_side: PaddingSide = "right"

    def to(self, device: torch.device | str) -> EncodedBatch:
        """A copy with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return EncodedBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=move(self.labels),
            item_positions=self.item_positions.to(device),
            item_ids=self.item_ids.to(device),
            padding_side=self.padding_side,
        )


class ItemTokenizer:
    """Tokenize (prompt, answer) pairs for training and prompts alone for generation.

    With a chat template (``use_chat_template=None`` uses one when the tokenizer has it) the prompt is the user
    message and the answer the assistant message; the labelled tokens are the answer and the template's end of
    turn (e.g. ``<|im_end|>``), so the model learns to stop; whitespace the template writes after the end-of-turn
    token is dropped. Without one, the answer is ``answer_prefix + answer +
    answer_suffix`` (LLaRA: the title followed by a newline) after the prompt.

    Prompt and answer are tokenized separately and concatenated, so the prompt's ids during training are exactly
    those :meth:`encode` gives for generation, and no token straddles the prompt/answer boundary.

    Constructing one adds :data:`ITEM_TOKEN` to ``tokenizer`` (pass ``model`` to resize its embeddings too).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model: PreTrainedModel | None = None,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        answer_prefix: str = " ",
        answer_suffix: str = "\n",
        max_length: int | None = None,
    ) -> None:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.uses_chat_template = has_template if use_chat_template is None else use_chat_template
        self.system_prompt = system_prompt
        self.answer_prefix = answer_prefix
        self.answer_suffix = answer_suffix
        self.max_length = max_length
        self.item_token_id = add_item_token(tokenizer, model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        self.pad_token_id = int(pad)
        # ids of every special token (end-of-turn markers such as <|im_end|> or <end_of_turn> among them)
        self._candidate_ids: dict[str, list[int]] = {}  # candidate_token_ids' cache
        self._special_ids = frozenset(tokenizer.all_special_ids) | frozenset(
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special
        )

    # text level

    def prompt_text(self, prompt: str) -> str:
        """The text the model sees before its answer: the chat-templated user turn plus the assistant header, or
        the prompt itself."""
        if not self.uses_chat_template:
            return prompt
        return self._chat(self._messages(prompt), add_generation_prompt=True)

    def answer_text(self, prompt: str, answer: str) -> str:
        """The text after :meth:`prompt_text` in a training sample: the assistant turn as the chat template
        renders it (the end-of-turn marker included), or ``answer_prefix + answer + answer_suffix``."""
        return self._answer_text(self.prompt_text(prompt), prompt, answer)

    def answer_token_ids(self, answer: str, prompt: str = "") -> list[int]:
        """The labelled token ids of ``answer``; CTR scoring reads the first of "Yes." and "No."."""
        return self._answer_ids([self.answer_text(prompt, answer)])[0]

    def candidate_token_ids(self, title: str) -> list[int]:
        """What score mode and the listwise objective score for a candidate: its whole answer, end of turn
        included ("this title, then stop"); tokenized once per title."""
        if title not in self._candidate_ids:
            self._candidate_ids[title] = self.answer_token_ids(title)
        return self._candidate_ids[title]

    # token level

    def tokenize(
        self, prompts: Sequence[Prompt | str], answers: Sequence[str] | None = None
    ) -> list[Tokenized]:
        """Each sample's tokens, unpadded: the prompt (chat template applied) and, with ``answers``, the answer
        with its end of turn. Checks that every placeholder has its item id and that nothing is over
        ``max_length``. :meth:`pad` makes a batch of them; a sample tokenized once serves training (with its
        answer) and evaluation (its prompt alone)."""
        prompts = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        head_texts = [self.prompt_text(p.text) for p in prompts]
        heads = self._ids(head_texts, special=not self.uses_chat_template)
        if answers is None:
            tails: list[list[int]] = [[] for _ in prompts]
        else:
            texts = [
                self._answer_text(head, p.text, a)
                for head, p, a in zip(head_texts, prompts, answers, strict=True)
            ]
            tails = self._answer_ids(texts)
        for row, (prompt, head, tail) in enumerate(zip(prompts, heads, tails, strict=True)):
            found = head.count(self.item_token_id) + tail.count(self.item_token_id)
            if found != len(prompt.item_ids):
                raise ValueError(
                    f"sample {row}: {found} {ITEM_TOKEN} tokens in the text but {len(prompt.item_ids)} item ids"
                )
            if self.max_length is not None and len(head) + len(tail) > self.max_length:
                raise ValueError(
                    f"sample {row} has {len(head) + len(tail)} tokens, over max_length={self.max_length}; "
                    "shorten the history rather than truncate (that would cut placeholders or the answer)"
                )
            if answers is not None and not tail:
                raise ValueError(f"sample {row}: the answer has no tokens")
        return [
            Tokenized(head, tail, list(p.item_ids))
            for p, head, tail in zip(prompts, heads, tails, strict=True)
        ]

    def pad(
        self, samples: Sequence[Tokenized], *, answers: bool, padding_side: PaddingSide | None = None
    ) -> EncodedBatch:
        """A batch of tokenized samples. ``answers``: training inputs (prompt + answer, labels on the answer;
        default right padding); else generation prompts (the prompts alone, no labels; default left padding, so
        every row ends where generation starts)."""
        side: PaddingSide = padding_side or ("right" if answers else "left")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        tails = [s.tail if answers else [] for s in samples]
        heads = [s.head for s in samples]
        width = max((len(h) + len(t) for h, t in zip(heads, tails, strict=True)), default=0)
        batch = len(samples)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long) if answers else None
        for row, (head, tail) in enumerate(zip(heads, tails, strict=True)):
            length = len(head) + len(tail)
            start = width - length if side == "left" else 0
            input_ids[row, start : start + length] = torch.tensor(head + tail, dtype=torch.long)
            attention_mask[row, start : start + length] = 1
            if labels is not None:
                labels[row, start + len(head) : start + length] = torch.tensor(tail, dtype=torch.long)

        # the pad token is never the placeholder, so the mask of real placeholders is exact
        item_positions = (input_ids == self.item_token_id).nonzero()
        item_ids = torch.tensor([i for s in samples for i in s.item_ids], dtype=torch.long)
        return EncodedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            item_positions=item_positions,
            item_ids=item_ids,
            padding_side=side,
        )

    def encode(
        self,
        prompts: Sequence[Prompt | str],
        answers: Sequence[str] | None = None,
        *,
        padding_side: PaddingSide | None = None,
    ) -> EncodedBatch:
        """Tokenize and pad a batch (:meth:`tokenize`, then :meth:`pad`). With ``answers``: training inputs with
        labels (default right padding). Without: generation prompts, no labels (default left padding)."""
        if padding_side is not None and padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        return self.pad(
            self.tokenize(prompts, answers), answers=answers is not None, padding_side=padding_side
        )

    def __call__(
        self,
        prompts: Sequence[Prompt | str],
        answers: Sequence[str] | None = None,
        *,
        padding_side: PaddingSide | None = None,
    ) -> EncodedBatch:
        return self.encode(prompts, answers, padding_side=padding_side)

    def _answer_text(self, head: str, prompt: str, answer: str) -> str:
        if not self.uses_chat_template:
            return self.answer_prefix + answer + self.answer_suffix
        full = self._chat([*self._messages(prompt), {"role": "assistant", "content": answer}])
        if not full.startswith(head):
            raise ValueError(
                "the chat template renders a conversation that does not start with its generation prompt; "
                "set use_chat_template=False for this tokenizer"
            )
        return full[len(head) :]

    def _answer_ids(self, texts: list[str]) -> list[list[int]]:
        """Answer token ids, ending at the chat template's end-of-turn token: whitespace the template writes
        after it (ChatML's newline) is not part of the answer, so it is neither labelled nor fed."""
        ids = self._ids(texts, special=False)
        if not self.uses_chat_template:
            return ids
        return [self._trim_after_end_of_turn(row) for row in ids]

    def _trim_after_end_of_turn(self, ids: list[int]) -> list[int]:
        end = len(ids)
        while (
            end > 0
            and ids[end - 1] not in self._special_ids
            and not self.tokenizer.decode(ids[end - 1 :]).strip()
        ):
            end -= 1
        if 0 < end < len(ids) and ids[end - 1] in self._special_ids:
            return ids[:end]
        return ids  # no special token before the trailing whitespace: keep it, it may be the only terminator

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        messages = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        )
        return [*messages, {"role": "user", "content": prompt}]

    def _chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
        return text

    def _ids(self, texts: list[str], *, special: bool) -> list[list[int]]:
        """Token ids per text. Chat-templated text already holds its special tokens (BOS included), so it is
        tokenized with ``add_special_tokens=False``, as transformers' own ``apply_chat_template`` does."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        return [list(ids) for ids in encoded]
