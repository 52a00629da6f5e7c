"""Train ProfileLSTM on a behaviour log: next-type and next-category prediction.

Users are split by a salted hash of their id (train / val / test; test users
are never touched here, so ``evaluate --users test`` measures users the model
never saw).  Each user's whole sequence is one training example: the loss at
every event is the cross-entropy of the next event's type plus that of its
category among [the user's remembered categories, the vocabulary].  Inputs
and candidates do not depend on the weights, so they are computed once.
Validation loss picks the epoch (early stopping); validation metrics are
logged every epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.baselines import fit_type_baselines
from models.checkpoint import ModelConfig, save_checkpoint
from models.data import SPLITS, group_by_user, select_users
from models.evaluate import evaluate
from models.events import TYPE_INDEX, Event
from models.features import padded_index
from models.inference import ProfileModel, build_network, resolve_device
from models.model import Dims, ProfileLSTM

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Everything `train` can be told (the CLI flags); recorded in the checkpoint."""

    dims: Dims = field(default_factory=Dims)
    epochs: int = 30
    batch_users: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 4
    intent_weight: float = 1.0     # weight of the next-type loss against the next-category loss
    seed: int = 0
    val_frac: float = 0.15
    test_frac: float = 0.15
    salt: str = "profilestream"
    max_vocab: int = 4096
    device: str = "auto"


@dataclass
class _Split:
    """One split's inputs and targets as tensors, users sorted longest first."""

    ints: torch.Tensor        # [T, U, 5]
    dense: torch.Tensor       # [T, U, F]
    lengths: np.ndarray       # [U]
    starts: np.ndarray        # [U] offset of each user's first event in the flat arrays
    cand: tuple[torch.Tensor, ...]   # flat [N, ...]: ProfileModel.candidate_tensors
    next_type: torch.Tensor   # [N], -1 at a user's last event
    next_cat: torch.Tensor    # [N], slot among [C memory, V vocab]; -1 = no next / unknown category


def _prepare(sequences: list[list[Event]], model: ProfileModel) -> _Split:
    sequences = sorted(sequences, key=len, reverse=True)
    batch = model.featurizer.run([model.new_state() for _ in sequences], sequences, every_event=True)
    cands = batch.candidates
    capacity = cands.keys.shape[1]
    lengths = batch.lengths
    starts = np.cumsum(lengths) - lengths
    last = np.zeros(int(lengths.sum()), dtype=bool)
    last[starts + lengths - 1] = True

    kinds = np.array([TYPE_INDEX[e.type] for seq in sequences for e in seq])
    next_type = np.where(last, -1, np.roll(kinds, -1))
    next_key = np.roll(batch.cat_keys, -1)
    in_memory = (cands.keys == next_key[:, None]) & cands.valid
    next_cat = np.where(in_memory.any(axis=1), in_memory.argmax(axis=1), -1)
    from_vocab = model.vocab.index(next_key)
    next_cat = np.where((next_cat < 0) & (from_vocab >= 0), capacity + from_vocab, next_cat)
    next_cat[last] = -1

    put = model.to_device
    ints, dense = batch.padded()
    return _Split(put(ints), put(dense), lengths, starts, model.candidate_tensors(cands),
                  put(next_type), put(next_cat))


def _loss(net: ProfileLSTM, data: _Split, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(intent loss, category loss) over every event of ``users`` (indices into the split)."""
    lengths = data.lengths[users]
    t_len = int(lengths.max())
    dev = data.ints.device
    users_t = torch.from_numpy(users).to(dev)
    out, _ = net(data.ints[:t_len, users_t], data.dense[:t_len, users_t])
    t_idx, b_idx = padded_index(lengths)
    h = out[torch.from_numpy(t_idx).to(dev), torch.from_numpy(b_idx).to(dev)]
    flat = torch.from_numpy(np.concatenate([np.arange(s, s + n) for s, n in zip(data.starts[users], lengths)])).to(dev)
    *memory, wide = (c[flat] for c in data.cand)
    intent = F.cross_entropy(net.intent_logits(h, wide), data.next_type[flat], ignore_index=-1)
    scores = net.category_logits(h, net.profile(h), *memory)
    category = F.cross_entropy(scores, data.next_cat[flat], ignore_index=-1)
    return intent, category


def _batches(lengths: np.ndarray, batch_users: int, rng: random.Random) -> list[np.ndarray]:
    """Users are sorted longest first, so consecutive users pad little; batch order is shuffled."""
    batches = [np.arange(i, min(i + batch_users, len(lengths))) for i in range(0, len(lengths), batch_users)]
    rng.shuffle(batches)
    return batches


def _validation_loss(net: ProfileLSTM, data: _Split, intent_weight: float) -> float:
    net.eval()
    total, weight = 0.0, 0
    with torch.no_grad():
        for users in _batches(data.lengths, 64, random.Random(0)):
            intent, category = _loss(net, data, users)
            n = int(data.lengths[users].sum())
            total += float(intent_weight * intent + category) * n
            weight += n
    return total / max(weight, 1)


def train(events: Sequence[Event], options: TrainOptions, description: dict[str, Any]) -> tuple[ModelConfig, ProfileLSTM]:
    """Train on the train split of ``events``; returns the config and the best network (on CPU)."""
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    device = resolve_device(options.device)
    split = {"salt": options.salt, "val_frac": options.val_frac, "test_frac": options.test_frac}
    users = group_by_user(events)
    parts = {name: list(select_users(users, split, name).values()) for name in SPLITS}
    log.info("users: %s (test users are left out of training entirely)",
             ", ".join(f"{k} {len(v)} ({sum(map(len, v))} events)" for k, v in parts.items()))
    if not parts["train"] or not parts["val"]:
        raise ValueError("need users in both the train and the val split; give more data or change --val-frac")

    counts = Counter(e.category_id for seq in parts["train"] for e in seq)
    config = ModelConfig(
        dims=options.dims, vocab=[c for c, _ in counts.most_common(options.max_vocab)],
        version=(f"profile-lstm h{options.dims.hidden} d{options.dims.profile_dim} "
                 f"{description.get('data', 'data')} {datetime.now(timezone.utc):%Y-%m-%d}"),
        split=split, baselines=fit_type_baselines(parts["train"]))
    net = build_network(config).to(device)
    probe = ProfileModel(config, net, "0" * 16, device)   # the inference path, for features and val metrics
    featurize_start = time.perf_counter()
    train_data, val_data = (_prepare(parts[s], probe) for s in ("train", "val"))
    log.info("featurised in %.1f s", time.perf_counter() - featurize_start)

    optimizer = torch.optim.AdamW(net.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    best = (math.inf, 0, {k: v.detach().clone() for k, v in net.state_dict().items()}, {})
    history = []
    for epoch in range(1, options.epochs + 1):
        net.train()
        batches = _batches(train_data.lengths, options.batch_users, rng)
        bar = tqdm(batches, desc=f"epoch {epoch}/{options.epochs}", unit="batch", leave=False)
        for users in bar:
            intent, category = _loss(net, train_data, users)
            optimizer.zero_grad(set_to_none=True)
            (options.intent_weight * intent + category).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            bar.set_postfix(intent=f"{intent.item():.3f}", category=f"{category.item():.3f}")
        val_loss = _validation_loss(net, val_data, options.intent_weight)
        metrics = evaluate(probe, parts["val"])["results"]["model"]
        history.append({"epoch": epoch, "val_loss": round(val_loss, 5), **{k: round(v, 4) for k, v in metrics.items()}})
        log.info("epoch %d: val loss %.4f  %s", epoch, val_loss, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()}, metrics)
        elif epoch - best[1] >= options.patience:
            log.info("early stop: no validation improvement for %d epochs", options.patience)
            break
    net.load_state_dict(best[2])
    config.training = {**description, "options": dataclasses.asdict(options), "best_epoch": best[1],
                       "epochs_run": len(history), "history": history}
    return config, net.cpu().eval()


def train_to_file(events: Sequence[Event], options: TrainOptions, out: str, description: dict[str, Any]) -> str:
    """Train and write the checkpoint; returns its fingerprint."""
    config, net = train(events, options, description)
    fp = save_checkpoint(out, config, net.state_dict())
    log.info("wrote %s (fingerprint %s, best epoch %d)", out, fp, config.training["best_epoch"])
    return fp
