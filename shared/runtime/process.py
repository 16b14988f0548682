"""The one per-process cache: what a process keeps between the messages (or `proper local` steps) it
serves, in named fields, and nothing anywhere else.

Why a cache at all: a simulation process serves many SuperNodes and many messages each, and a client
built afresh per message would load the backbone, parse every user's file and check the run's config
again every time (seconds per message, and quadratic in users: bench/scale.py). Each field holds the
last value only, keyed by what it was built from: a new key replaces it, so memory stays flat whatever
the number of clients a process serves.

    config      (config.yaml text, its checked read-only DictConfig): the run config the apps read for
                every message (shared/runtime/runconfig.py shared_config)
    model       (model key, (ProperModel, tokenizer)): the one backbone with its adapters
                (client/model.py get_model); `model_of` remembers the key of the apps' read-only config
    users       (data key, (TaskSpec, users)): the run's users, parsed once (client/data.py all_users);
                `users_of` remembers the key of the apps' read-only config
    trainer     (node key, ClientTrainer): the client whose users this process serves now
                (client/runtime.py trainer_for)
    eval_arrays {record name: (the last ArrayRecord converted, its tensors)}: an evaluate message's
                parameters, converted once for the virtual clients of a bundle (client/runtime.py)
    prefetched  {(stage, split): {user id: predictions}}: predictions made for the users of a bundle's
                virtual clients at once, set only while that bundle is answered (client/virtual.py)
    client_ids  (number of clients, their ids) (client/virtual.py)

Cleared: field by field when a new key replaces the old (above); `prefetched` when its bundle is
answered; everything by `clear()` (tests that need a fresh process).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProcessCache:
    config: tuple | None = None
    model: tuple | None = None
    model_of: tuple | None = None      # (the read-only config object, its model key)
    users: tuple | None = None
    users_of: tuple | None = None      # (the read-only config object, its users)
    trainer: tuple | None = None
    eval_arrays: dict = field(default_factory=dict)
    prefetched: dict = field(default_factory=dict)
    client_ids: tuple | None = None

    def clear(self) -> None:
        self.__init__()


PROCESS = ProcessCache()   # created once per process: the only module-level state the apps keep
