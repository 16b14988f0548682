"""Tokenisation and batches: a LaMP item as prompt + answer ids (only the answer is learned)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from shared.data.retrieval import fit

ANSWER = "\nAnswer:"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]   # -100 on prompt tokens: only the output is learned
    user: int           # index of the user in the caller's user list


def encode_prompt(tokenizer, text: str, max_prompt: int, context=None) -> list[int]:
    """Prompt ids, cut in the body (not the answer cue) when too long. context: the user's items
    retrieved for this query (shared/data/retrieval.py Retrieved), written before the question and cut
    first, so the question stays whole while any of them fits; None (retrieval off) = the question alone."""
    cue = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    if context is not None:
        ids = fit(tokenizer, context, text, max_prompt - len(cue))
        if ids is not None:
            return ids + cue
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    return body[: max(1, max_prompt - len(cue))] + cue


def encode_chat_prompt(tokenizer, text: str, max_prompt: int, context=None) -> list[int]:
    """Prompt ids in the instruct model's own format: `text` as the user's turn of the tokenizer's
    chat template with the assistant's turn opened, no answer cue; the body cut when the whole is
    longer than max_prompt (to about that length: the cut body is decoded and templated again).
    context: the user's retrieved items (as in encode_prompt), before the question in the same turn,
    cut first."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("base-chat (and rag with retrieval.chat) asks the bare backbone through its chat "
                         "template, and this model's tokenizer has none")

    def wrap(body: str) -> list[int]:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(chat, add_special_tokens=False)["input_ids"]

    if context is not None:
        fitted = fit(tokenizer, context, text, max_prompt - len(wrap("")))
        if fitted is not None:
            return wrap(tokenizer.decode(fitted))
    ids = wrap(text)
    if len(ids) > max_prompt:
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = wrap(tokenizer.decode(body[: max(1, len(body) - (len(ids) - max_prompt))]))
    return ids


def encode_example(tokenizer, ex, user: int, max_len: int) -> Encoded:
    target = tokenizer(" " + ex.output.strip(), add_special_tokens=False)["input_ids"][: max_len // 2]
    target = target + [tokenizer.eos_token_id]
    prompt = encode_prompt(tokenizer, ex.input, max_len - len(target), getattr(ex, "context", None))
    return Encoded(prompt + target, [-100] * len(prompt) + target, user)


def make_batches(items: list[Encoded], batch_size: int, pad_id: int, rng: random.Random | None):
    """Length-grouped batches (little padding), in random order when rng is given."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(chunks)
    for chunk in chunks:
        width = max(len(items[i].input_ids) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(items[i].input_ids)
            ids[row, :n] = torch.tensor(items[i].input_ids)
            labels[row, :n] = torch.tensor(items[i].labels)
            mask[row, :n] = 1
        users = torch.tensor([items[i].user for i in chunk], dtype=torch.long)
        yield ids, mask, labels, users


def n_batches(items, batch_size: int) -> int:
    return math.ceil(len(items) / batch_size)


def encode_users(tokenizer, users, max_len, split="train"):
    items = []
    for i, u in enumerate(users):
        items += [encode_example(tokenizer, ex, i, max_len) for ex in getattr(u, split)]
    return items


def placed(batch, device) -> list[torch.Tensor]:
    """A batch (ids, mask, labels, user indices) on `device`, the client's (decided once:
    shared/runtime/precision.py client_device, client/model.py); a no-op on the CPU."""
    return [t.to(device) for t in batch]
