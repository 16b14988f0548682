"""Predictions for a set of users at one stage.

Predictions for label tasks come from greedy generation mapped onto the label set
(eval.mode=generate, what LaMP does) or from the most likely label (eval.mode=score). They are
scored by shared/evaluation/metrics.py, into sufficient statistics a server can add up.
"""
from __future__ import annotations

import torch

from shared.data.encode import encode_chat_prompt, encode_prompt
from shared.evaluation import metrics as M
from shared.evaluation.metrics import add_stats, example_stats, stats_metrics  # noqa: F401 (re-exported)
from shared.runtime.precision import autocast, use_bf16

# The metrics live in metrics.py; the three names above are imported from here by client/ and sim/local.py.

MAX_NEW_TOKENS = {"label": 8, "rating": 3, "generation": 32}   # eval.max_new_tokens when null


# ---------------------------------------------------------------- predictions
def generate(model, tokenizer, prompts: list[list[int]], user_emb: torch.Tensor | None,
             max_new_tokens: int, batch_size: int = 16, bf16: bool = True,
             user_rows: torch.Tensor | None = None) -> list[str]:
    """Greedy generation, left-padded batches; user_emb [N, d] routes row i for user i; user_rows [N]:
    in stage 3, prompt i's user among the parts given to model.user_parts (multi-user batches)."""
    tokens = generate_tokens(model, tokenizer, prompts, user_emb, max_new_tokens, batch_size, bf16,
                             user_rows=user_rows)
    return [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


@torch.no_grad()
def generate_tokens(model, tokenizer, prompts: list[list[int]], user_emb: torch.Tensor | None,
                    max_new_tokens: int, batch_size: int = 16, bf16: bool = True, streamer=None,
                    user_rows: torch.Tensor | None = None, fused: bool = False) -> list[list[int]]:
    """The generated token ids of each prompt (end and padding included), as `generate` decodes them:
    the one generation loop evaluation and serving (client/serving.py) share. streamer: HF's
    put/end interface, batch_size 1. fused: one user's layers served fused (ProperModel.fused;
    serving only, never the evaluation)."""
    out = []
    pad, dev = tokenizer.pad_token_id, model.device   # inputs go where the model is (the client's device)
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        emb = None if user_emb is None else user_emb[s:s + len(chunk)].to(dev)
        rows = None if user_rows is None else user_rows[s:s + len(chunk)].to(dev)
        with autocast({"bf16": bf16}, dev.type), model.users(emb, rows=rows), model.fused(fused):
            gen = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                    streamer=streamer)
        out += gen[:, width:].tolist()
    return out


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: list[list[int]], labels: list[str], user_emb: torch.Tensor | None,
                   bf16: bool = True, batch_size: int = 8, user_rows: torch.Tensor | None = None,
                   pack: bool | None = None) -> torch.Tensor:
    """[N, L] log-probability of each label's tokens (and the end of the answer) after each prompt.

    A batch of prompts runs once (left-padded, explicit positions); its KV cache is then shared
    by every label's continuation, so scoring 15 labels costs about one prompt forward, not 15.
    Exact: every router here (user-aware and LoRA-aware) is per token, so a cached prefix is the
    same whatever follows it.
    """
    targets = [tokenizer(" " + lab, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for lab in labels]
    n, width = len(targets), max(len(t) for t in targets)
    dev = model.device   # inputs go where the model is (the client's device); the scores come back to the CPU
    cont = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros_like(cont)
    for j, t in enumerate(targets):
        cont[j, :len(t)] = torch.tensor(t)
        cont_mask[j, :len(t)] = 1
    cont, cont_mask = cont.to(dev), cont_mask.to(dev)
    # under SDPA attention every label's tokens go in one row per prompt (a block-causal mask keeps the
    # labels apart): ~40 positions for LaMP-2's 15 labels instead of 15 padded rows of 6 and no copy of
    # the prompt's cache per label; another attention implementation takes the rows below
    # (pack=False takes the rows under SDPA too: bench/scoring.py compares the two)
    sdpa = getattr(model.lm.config, "_attn_implementation", None) == "sdpa"
    packed = _packing(targets, dev) if sdpa and pack is not False else None
    # batches of similar lengths (little padding), results put back in the caller's order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = []
    for s in range(0, len(prompts), batch_size):
        idx = order[s:s + batch_size]
        chunk = [prompts[i] for i in idx]
        b, plen = len(chunk), max(len(p) for p in chunk)
        ids = torch.full((b, plen), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, plen - len(p):] = torch.tensor(p)
            mask[i, plen - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        lengths = mask.sum(1)
        emb = None if user_emb is None else user_emb[idx].to(dev)
        who = None if user_rows is None else user_rows[idx].to(dev)   # each prompt's user (multi-user batch)
        with autocast({"bf16": bf16}, dev.type), model.users(emb, rows=who):
            # only the last position's logits are read: projecting every prompt position onto the
            # 49k-token vocabulary was ~20 % of the prompt forward's FLOPs
            first = model.lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                             use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        if packed is not None:
            out.append(_packed_continuations(model, first, cache, packed, mask, lengths, emb, who, bf16))
            continue
        cache.batch_repeat_interleave(n)                      # row i*n + j: prompt i, label j
        rows = cont.repeat(b, 1)
        rows_mask = torch.cat([mask.repeat_interleave(n, 0), cont_mask.repeat(b, 1)], 1)
        pos = lengths.repeat_interleave(n).view(-1, 1) + torch.arange(width, device=dev)
        with autocast({"bf16": bf16}, dev.type), model.users(None if emb is None else emb.repeat_interleave(n, 0),
                                                   rows=None if who is None else who.repeat_interleave(n)):
            rest = model.lm(input_ids=rows, attention_mask=rows_mask, position_ids=pos, past_key_values=cache,
                            use_cache=True)
        # label token j is predicted by the prompt's last position (j = 0) or by label token j-1
        last = first.logits[:, -1:].float().repeat_interleave(n, 0)
        logp = torch.log_softmax(torch.cat([last, rest.logits[:, :-1].float()], 1), -1)
        tok = logp.gather(-1, rows.unsqueeze(-1)).squeeze(-1) * cont_mask.repeat(b, 1)
        out.append(tok.sum(1).view(b, n).cpu())
    if not out:
        return torch.zeros(0, n)
    result = torch.empty(len(prompts), n)
    result[order] = torch.cat(out)
    return result


def _packing(targets: list[list[int]], dev) -> dict:
    """Every label's tokens in one row: the tokens, each one's offset inside its label, the block-causal
    mask among them (a token sees its own label's earlier tokens), and where each label starts."""
    tokens = torch.tensor([t for tgt in targets for t in tgt], device=dev)
    offset = torch.tensor([k for tgt in targets for k in range(len(tgt))], device=dev)
    label = torch.tensor([j for j, tgt in enumerate(targets) for _ in tgt], device=dev)
    block = (label.view(-1, 1) == label.view(1, -1)) & (offset.view(-1, 1) >= offset.view(1, -1))
    return {"tokens": tokens, "offset": offset, "label": label, "block": block, "n": len(targets)}


def _packed_continuations(model, first, cache, packed: dict, mask, lengths, emb, who, bf16: bool) -> torch.Tensor:
    """[b, n] log-probabilities of the n labels after b cached prompts, all labels in one row per prompt."""
    tokens, offset, label, n = packed["tokens"], packed["offset"], packed["label"], packed["n"]
    b, s = mask.shape[0], tokens.shape[0]
    rows = tokens.expand(b, s)
    attend = torch.cat([mask.bool().view(b, 1, 1, -1).expand(b, 1, s, mask.shape[1]),
                        packed["block"].view(1, 1, s, s).expand(b, 1, s, s)], -1)   # True: may attend
    pos = lengths.view(-1, 1) + offset.view(1, -1)
    with autocast({"bf16": bf16}, mask.device.type), model.users(emb, rows=who):
        rest = model.lm(input_ids=rows, attention_mask=attend, position_ids=pos, past_key_values=cache,
                        use_cache=True)
    # a label's first token is predicted by the prompt's last position, each later one by the token before
    prev = torch.log_softmax(rest.logits.float(), -1)                                  # [b, s, V]
    head = torch.log_softmax(first.logits[:, -1].float(), -1)                          # [b, V]
    lp = torch.where(offset.view(1, -1) == 0, head.gather(-1, rows),
                     prev.roll(1, dims=1).gather(-1, rows.unsqueeze(-1)).squeeze(-1))  # [b, s]
    return torch.zeros(b, n).index_add_(1, label.cpu(), lp.cpu())


def score_labels(model, tokenizer, prompts, labels: list[str], user_emb, bf16: bool = True,
                 batch_size: int = 8, user_rows: torch.Tensor | None = None) -> list[str]:
    """The most likely label after each prompt."""
    lp = label_logprobs(model, tokenizer, prompts, labels, user_emb, bf16, batch_size, user_rows)
    return [labels[i] for i in lp.argmax(1).tolist()]


def predict(model, tokenizer, spec, examples, cfg, user_emb: torch.Tensor | None = None,
            user_rows: torch.Tensor | None = None, chat: bool = False, retrieved: bool = True) -> list[str]:
    """Predictions for `examples` (all routed with user_emb rows, if given; in stage 3 with each
    example's user part, user_rows, among those given to model.user_parts), post-processed.
    chat: the prompts in the tokenizer's chat template instead of the training format (the
    zero-shot row of the bare instruct model, stage base-chat; stage rag with retrieval.chat).
    retrieved: an example's retrieved items (ex.context, retrieval.k > 0) go before its question;
    False asks the question alone (the bare row, stage base)."""
    max_len = cfg.train.max_len
    if chat:
        prompts = [encode_chat_prompt(tokenizer, ex.input, max_len, getattr(ex, "context", None) if retrieved else None)
                   for ex in examples]
    else:
        prompts = [encode_prompt(tokenizer, ex.input, max_len, getattr(ex, "context", None) if retrieved else None)
                   for ex in examples]
    bf16 = use_bf16(cfg.train.bf16)
    if spec.kind == "label" and cfg.eval.mode == "score":
        return score_labels(model, tokenizer, prompts, spec.labels, user_emb, bf16, int(cfg.eval.batch_size),
                            user_rows)
    n_new = cfg.eval.max_new_tokens or MAX_NEW_TOKENS[spec.kind]
    texts = generate(model, tokenizer, prompts, user_emb, n_new, cfg.eval.batch_size, bf16, user_rows)
    if spec.kind == "label":
        return [M.match_label(t, spec.labels) or t for t in texts]
    if spec.kind == "rating":
        return [t.split()[0] if t.split() else t for t in texts]
    return texts
