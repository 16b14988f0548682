"""The client's private store: what it keeps of its users on its own disk and never sends.

  e_u                   <user>.embedding.safetensors: the latest e_u and the one its last group round
                        started from (a round redone after a crash starts where it did)
  user LoRA             <user>.user/ (a PEFT adapter directory on the population-merged backbone) and
                        <user>.router.safetensors (its LoRA-aware router W_g, b_g)
  sent mixtures         sent_mixtures.safetensors: what the last group round released, to tell the
                        client's own users apart in the pool the server sends back
  users' mixtures       mixtures.csv: each user's mixture, for group recovery after the run
  shared parts          population_lora/, group.safetensors, config.yaml: a deployed client's copy of
                        the run's final shared parts (export_shared_parts)

A store is a UserStore (shared/runtime/persist.py), or a RoutedStore reading several virtual clients'.
"""
from __future__ import annotations

from pathlib import Path

import torch

from client.data import initial_embedding
from shared.method.model import ProperModel
from shared.runtime.persist import (
    UserStore,
    atomic_write_text,
    export_peft_adapter,
    import_peft_adapter,
    load_tensors,
    read_peft_adapter,
    save_group,
    save_tensors,
)

SENT = "sent_mixtures.safetensors"


# ---- e_u
def embedding(store, user_id: str, seed: int, d_user: int, for_round: int | None = None) -> torch.Tensor:
    """e_u: the latest, or the one a group round `for_round` starts from; the seeded start before any."""
    saved = store.load(user_id, "embedding")
    if saved is not None:
        if for_round is not None and int(saved["round"]) >= for_round:
            return saved["e_u_before"]
        return saved["e_u"]
    return initial_embedding(seed, user_id, d_user)


def save_embedding(store, user_id: str, e_u: torch.Tensor, before: torch.Tensor, rnd: torch.Tensor):
    store.save(user_id, "embedding", {"e_u": e_u, "e_u_before": before, "round": rnd})


# ---- the user LoRA and LoRA-aware router
def save_user_adapter(model: ProperModel, store, user_id: str, backbone: str):
    """The model's user LoRA as a PEFT adapter directory, and the LoRA-aware router beside it."""
    d = store.path(user_id, "user").with_suffix("")
    export_peft_adapter(model, "user", d, base_model=f"{backbone} + population LoRA")
    router = {k: v for k, v in model.part_state("user").items() if ".router_g" in k}
    store.save(user_id, "router", router)


def _router(store, user_id: str) -> dict[str, torch.Tensor]:
    router = store.load(user_id, "router")
    if router is None:
        raise FileNotFoundError(f"no LoRA-aware router stored for user {user_id!r} in {store.root}")
    return router


def load_user_adapter(model: ProperModel, store, user_id: str):
    """A user's LoRA and LoRA-aware router from the store into the model's user part."""
    import_peft_adapter(model, "user", store.path(user_id, "user").with_suffix(""))
    router = _router(store, user_id)
    state = model.part_state("user")
    state.update(router)
    model.load_part_state("user", state, source=str(store.path(user_id, "router")))


def read_user_adapter(model: ProperModel, store, user_id: str) -> dict[str, torch.Tensor]:
    """A user's LoRA and LoRA-aware router as a user-part state (what part_state("user") gives once
    load_user_adapter put them in), read from the store without loading them into the model, checked
    against it: the parts a multi-user batch stacks (ProperModel.user_parts)."""
    path = store.path(user_id, "user").with_suffix("")
    state = read_peft_adapter(model, "user", path)
    state.update(_router(store, user_id))
    model.check_part_state("user", state, source=str(path))
    return state


# ---- the mixtures a group round released
def save_sent(store, mixtures: torch.Tensor, previous: torch.Tensor, rnd: torch.Tensor):
    """Remember what a round released (and what the round before it did), by round."""
    save_tensors(store.root / SENT, {"mixtures": mixtures, "previous": previous, "round": rnd})


def own_mixtures(store, server_round: int) -> torch.Tensor | None:
    """The mixtures this client sent in the round before `server_round`."""
    path = store.root / SENT
    if not path.exists():
        return None
    saved = load_tensors(path)[0]
    return saved["previous"] if int(saved["round"]) >= server_round else saved["mixtures"]


def drop_own(store, others: torch.Tensor, server_round: int) -> torch.Tensor:
    """The server's pool holds this client's own users too (it cannot tell, no ids travel);
    pushing a user away from its own previous mixture would be wrong, so drop exact matches."""
    own = own_mixtures(store, server_round)
    if own is None or not len(own) or own.shape[1:] != others.shape[1:]:
        return others
    own = own.to(others.dtype)
    keep = [i for i in range(len(others)) if not any(torch.equal(others[i], o) for o in own)]
    return others[keep]


def save_user_mixtures(store, user_ids: list[str], by_user: torch.Tensor, server_round: int):
    """Each user's mixture and dominant expert, on this client's disk only: what group recovery
    (shared/evaluation/groups.py) compares with known groups after the run."""
    from shared.evaluation.groups import write_user_mixtures
    write_user_mixtures(store.root, user_ids, by_user.numpy(), server_round)


# ---- the run's shared parts
def export_shared_parts(model: ProperModel, out_dir: Path, with_group: bool, backbone: str,
                        config_yaml: str | None = None):
    """The run's shared parts as the model holds them, in the files `proper local` writes (docs/formats.md):
    population_lora/ (PEFT) and group.safetensors, with config.yaml when given. What serving and
    enrollment (client/serving.py) load on a machine that has them."""
    export_peft_adapter(model, "population", out_dir / "population_lora", base_model=backbone)
    if with_group:
        save_group(model, out_dir / "group.safetensors")
    if config_yaml is not None:
        atomic_write_text(out_dir / "config.yaml", config_yaml)


class RoutedStore:
    """The UserStores of several virtual clients as one: each user's file in its own client's."""

    def __init__(self, stores: dict[str, UserStore]):
        self.stores = stores
        self.root = next(iter(stores.values())).root.parent

    def path(self, user_id: str, kind: str):
        return self.stores[user_id].path(user_id, kind)

    def load(self, user_id: str, kind: str):
        return self.stores[user_id].load(user_id, kind)

    def save(self, user_id: str, kind: str, tensors, metadata=None):
        self.stores[user_id].save(user_id, kind, tensors, metadata)
