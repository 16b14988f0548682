"""`proper generate` and `proper enroll`: the command line of client/serving.py.

  proper generate PLACE --user U [--user V ...] [--prompt TEXT ... | --prompts FILE] [--max-new-tokens N]
                 [--data DIR]
      PLACE: a local or simulated run directory, or a client's state directory. Prompts from
      --prompt, a file (one per line) or, with neither, stdin (one per line), written as the
      run's inputs were (the `\\nAnswer:` cue is added). One user: each answer streams to stdout as
      it is decoded, one line per prompt. Several: one line per user and prompt, `<user>\\t<answer>`.
      A run trained with retrieval.k > 0: each prompt gets the user's top-k history items, as the
      run's evaluation questions did, from --data DIR, else the files an enrolled user came from,
      else a deployed client's own files, else the run's data.path (client/serving.py); a user not
      in them is refused, and one with an empty profile there gets no items.
  proper enroll PLACE --data DIR [--user U ...]
      personalize the users of the LaMP files in DIR (all, or those named), who were not in the
      run, on its frozen shared parts; prints each file written.
"""
from __future__ import annotations

import sys
from pathlib import Path


def add_parsers(sub):
    s = sub.add_parser("generate", help="generate with users' personalized models of a finished run")
    s.add_argument("place", help="a run directory, or a client's state directory")
    s.add_argument("--user", action="append", required=True, help="a user id (repeat for several users)")
    s.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    s.add_argument("--prompts", default=None, help="a file of prompts, one per line ('-': stdin)")
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: eval.max_new_tokens of the run, or 32")
    s.add_argument("--data", default=None,
                   help="a run trained with retrieval.k > 0 puts the user's top-k items of its own history in "
                        "each prompt: the LaMP files (questions.json + outputs.json) holding the users' histories "
                        "(default: the files an enrolled user came from, else a deployed client's own --data, else "
                        "the run's data.path). A user whose profile there is empty (no history) gets no items, "
                        "the prompt as it is; one not there is refused")
    s.add_argument("--fused", action="store_true",
                   help="one user: decode through the fused layers (faster; equal to the evaluation's model up "
                        "to rounding, so a token can differ); several users share batches on the exact path")
    s = sub.add_parser("enroll", help="personalize users who join after a run, with no server round")
    s.add_argument("place", help="a local run directory, or the state directory of the client the users join")
    s.add_argument("--data", required=True, help="LaMP files (questions.json + outputs.json) holding the new users")
    s.add_argument("--user", action="append", default=None, help="only these user ids (repeat); default: all")


def read_prompts(args) -> list[str]:
    if args.prompt and args.prompts:
        raise SystemExit("proper generate: give --prompt or --prompts, not both")
    if args.prompt:
        return list(args.prompt)
    if args.prompts and args.prompts != "-":
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise SystemExit(f"proper generate: no prompts in {args.prompts or 'stdin'}")
    return prompts


class TextStream:
    """HF generate's streamer (put / end) writing one answer as it is decoded. The first put is the
    prompt (not shown). The ids so far are decoded whole each time and only the new text is written,
    held back while it ends in half a character (a byte-level token that needs the next one) or in
    white space (the answer is stripped, as the evaluation strips it)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] | None = None
        self.shown = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids or [], skip_special_tokens=True).strip()

    def _write_new(self, text: str):
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def put(self, value):
        if self.ids is None:
            self.ids = []
            return
        self.ids += value.reshape(-1).tolist()
        text = self._text()
        if not text.endswith("\ufffd"):
            self._write_new(text)

    def end(self):
        self._write_new(self._text())
        self.out.write("\n")
        self.out.flush()


def generate_main(args) -> int:
    from client.serving import Serving
    serving = Serving(args.place, exclusive=True, data=args.data)  # this process serves nothing else
    users = list(dict.fromkeys(args.user))
    for uid in users:  # refuse before loading the model or reading stdin
        serving.store_of(uid)
        serving.contexts(uid, [])   # with retrieval.k > 0: the user's history is found, or refused
    prompts = read_prompts(args)
    if len(users) == 1:  # streamed, so one prompt at a time
        for prompt in prompts:
            serving.generate_tokens(users[0], [prompt], args.max_new_tokens,
                                    streamer=TextStream(serving.tokenizer, sys.stdout), fused=args.fused)
        return 0
    for uid, texts in serving.generate_many(users, prompts, args.max_new_tokens).items():  # users share batches
        for text in texts:
            print(f"{uid}\t{text.replace(chr(10), ' ')}", flush=True)
    return 0


def enroll_main(args) -> int:
    from client.serving import Serving, read_users
    serving = Serving(args.place, exclusive=True)  # this process serves nothing else
    users = read_users(serving.cfg, args.data, args.user)
    for uid, paths in serving.enroll(users, data=args.data).items():
        for path in paths:
            print(f"{uid}\t{path}", flush=True)
    return 0
