"""What crosses the wire between the server and the clients: message types and record keys, once.

  message type        server sends                                  client replies
  train.population    arrays (population LoRA; empty = seeded init)  arrays, metrics
  train.group         arrays (experts + routers), population,        arrays, routing (routing_mass,
                      others (a pool of user mixtures, no ids)       mixtures: shuffled, no ids), metrics
  train.user          population, arrays (the final group part)     metrics only
  query.init          config part, [population]                     arrays: the seeded starting point
  query.mixtures      population, arrays (the group start)          routing (mixtures only), metrics
  query.signature     config phase (read, codes, em, assign),       signature: sums over the client's
                      [population], arrays (mean, centroids,        users only (per answer, per code,
                      log_maps, log_prior)                          per map; nothing in assign), metrics
  evaluate            population, arrays (or bank), config,         metrics (sufficient statistics,
                      [mean-mixture]                                per-user scores without ids), info
  query.mta_candidates / train.mta_anchor / train.mta_user: MTA (server/mta.py, client/mta.py)

Every config record is named CONFIG and every metric record METRICS; "num-examples" weighs a
reply in aggregation, "num-users" counts the users a reply covers (in training: the users with a
history, the only ones trained), "num-users-no-history" (evaluate replies, only where > 0) the users
with an empty history, which the server's table counts.
With privacy.dp.clipping=client the config record of train.population / train.group also carries
Flower's "clipping_norm": the client clips its update to it (client/privacy.py).
"""
from __future__ import annotations

# message types, one per stage and query
TRAIN_POPULATION = "train.population"
TRAIN_GROUP = "train.group"
TRAIN_USER = "train.user"
QUERY_INIT = "query.init"
QUERY_MIXTURES = "query.mixtures"
QUERY_SIGNATURE = "query.signature"
QUERY_PARTITION = "query.partition"
EVALUATE = "evaluate"
TRAIN_TYPES = {"population": TRAIN_POPULATION, "group": TRAIN_GROUP}

# record names
ARRAYS = "arrays"          # the shared part a message is about (population LoRA or group part)
POPULATION = "population"  # the final population LoRA (clients merge it: W_p)
OTHERS = "others"          # {"mixtures": [V, L, k]} other users' mixtures for the constraint loss
ROUTING = "routing"        # {"routing_mass": [L, k], "mixtures": [U, L, k]}
BANK = "bank"              # MTA's meta-LoRA bank
CONFIG = "config"
METRICS = "metrics"
MEAN_MIXTURE = "mean-mixture"  # {"mixture": [L, k]}: the mean of the pool, for users with no history
SIGNATURE = "signature"    # a query.signature reply's sums (shared/method/signature_sums.py)
INFO = "info"              # {"task": name}: the server holds no data and learns the task from here

# keys
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"  # a query.partition reply: the simulated node's partition (-1: none)
NUM_USERS = "num-users"
NUM_NO_HISTORY = "num-users-no-history"
SERVER_ROUND = "server-round"
