"""ProfileLSTM: one LSTM over a user's events, three small heads.

    event -> [type emb | category vec | item emb | price emb | dense] -> LSTM -> h
    h -> intent   (softmax over the canonical types: what the user does next;
                   plus a linear read of the user's wide features -- type shares,
                   time since each type, session counts: wide & deep)
    h -> profile  (L2-normalised D-dim vector)
    profile . category vec -> next-category scores, for
         * the user's remembered categories (+ an MLP over how recently/often/how
           they were used -- the part recency and frequency baselines know), and
         * the global vocabulary (categories seen in training, + a popularity bias),
         so ``top_categories`` can name real ids, including ones new to the user.

A category vector is the sum of two hashed embedding rows (see
models.features), shared by the input and the scorer: the profile lives in
the same space as categories, which is what makes it a profile.

``forward`` runs padded [T, B] sequences (training, replay); ``step`` advances
B users by one event; ``step_many`` advances B users by a varying number of
events (packed, so each user's final (h, c) is the one after its own last
event).  All three are the same nn.LSTM call, so they agree to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from models.features import CANDIDATE_FEATURES, DENSE_FEATURES, N_TYPES, WIDE_FEATURES

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each [1, B, hidden]


@dataclass(frozen=True)
class Dims:
    """Sizes that define the network's shapes (the checkpoint config holds them)."""

    hidden: int = 128
    profile_dim: int = 64
    type_dim: int = 8
    item_dim: int = 16
    price_dim: int = 4
    cat_buckets: int = 4096
    item_buckets: int = 0          # 0 = no item embedding
    price_buckets: int = 16
    cat_capacity: int = 32
    dropout: float = 0.2


class ProfileLSTM(nn.Module):
    """The network; :class:`models.inference.ProfileModel` wraps it with features and state."""

    def __init__(self, dims: Dims, vocab_buckets: torch.Tensor) -> None:
        """``vocab_buckets`` [V, 2]: hash buckets of the vocabulary (derived from the config, not learned)."""
        super().__init__()
        self.dims = dims
        self.type_emb = nn.Embedding(N_TYPES, dims.type_dim)
        self.cat_a = nn.Embedding(dims.cat_buckets, dims.profile_dim)
        self.cat_b = nn.Embedding(dims.cat_buckets, dims.profile_dim)
        self.item_emb = nn.Embedding(dims.item_buckets, dims.item_dim) if dims.item_buckets else None
        self.price_emb = nn.Embedding(dims.price_buckets, dims.price_dim)
        n_in = (dims.type_dim + dims.profile_dim + (dims.item_dim if dims.item_buckets else 0)
                + dims.price_dim + len(DENSE_FEATURES))
        self.lstm = nn.LSTM(n_in, dims.hidden)
        self.h0 = nn.Parameter(torch.zeros(dims.hidden))
        self.c0 = nn.Parameter(torch.zeros(dims.hidden))
        self.drop = nn.Dropout(dims.dropout)
        self.intent_head = nn.Linear(dims.hidden, N_TYPES)
        self.wide_head = nn.Linear(len(WIDE_FEATURES), N_TYPES, bias=False)
        nn.init.zeros_(self.wide_head.weight)
        self.profile_head = nn.Linear(dims.hidden, dims.profile_dim)
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.vocab_bias = nn.Parameter(torch.zeros(len(vocab_buckets)))
        self.rank_emb = nn.Embedding(dims.cat_capacity, 8)
        self.cand_ctx = nn.Linear(dims.hidden, 16)
        self.cand_mlp = nn.Sequential(nn.Linear(len(CANDIDATE_FEATURES) + 8 + 16, 32), nn.ReLU(), nn.Linear(32, 1))
        self.register_buffer("vocab_buckets", vocab_buckets.reshape(-1, 2), persistent=False)
        nn.init.normal_(self.cat_a.weight, std=0.1)
        nn.init.normal_(self.cat_b.weight, std=0.1)

    # -- recurrence -----------------------------------------------------------

    def initial_state(self, batch: int) -> State:
        """The learned starting (h, c) of an unseen user, for ``batch`` users."""
        return (self.h0.expand(1, batch, -1).contiguous(), self.c0.expand(1, batch, -1).contiguous())

    def category_vectors(self, buckets: torch.Tensor) -> torch.Tensor:
        """[..., 2] bucket pairs -> [..., profile_dim] category vectors."""
        return self.cat_a(buckets[..., 0]) + self.cat_b(buckets[..., 1])

    def vocab_vectors(self) -> torch.Tensor:
        """[V, profile_dim] vectors of the global candidate categories."""
        return self.category_vectors(self.vocab_buckets)

    def embed(self, ints: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[T, B, 5] ints + [T, B, F] dense -> [T, B, n_in] LSTM inputs."""
        parts = [self.type_emb(ints[..., 0]), self.category_vectors(ints[..., 1:3])]
        if self.item_emb is not None:
            parts.append(self.item_emb(ints[..., 3]))
        parts += [self.price_emb(ints[..., 4]), dense]
        return self.drop(torch.cat(parts, dim=-1))

    def forward(self, ints: torch.Tensor, dense: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Padded sequences: [T, B] inputs -> hidden after every event [T, B, hidden].

        The returned (h, c) is after step T for every user (padding included),
        so use :meth:`step_many` when users end at different steps.
        """
        if state is None:
            state = self.initial_state(ints.shape[1])
        return self.lstm(self.embed(ints, dense), state)

    def step(self, state: State, ints: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, State]:
        """Advance B users by exactly one event: [B, 5] ints, [B, F] dense -> h [B, hidden], new state."""
        out, new_state = self.forward(ints.unsqueeze(0), dense.unsqueeze(0), state)
        return out[0], new_state

    def step_many(self, state: State, ints: torch.Tensor, dense: torch.Tensor,
                  lengths: torch.Tensor) -> tuple[torch.Tensor, State]:
        """Advance user b by its ``lengths[b]`` events, given as flat rows, user-major
        ([N, 5] ints, [N, F] dense: user 0's events in order, then user 1's, ...).

        Returns h after each user's last event [B, hidden] and the matching (h, c).
        """
        if ints.shape[0] == lengths.shape[0]:
            return self.step(state, ints, dense)
        _, (h, c) = self.lstm(self._pack(ints, dense, lengths), state)
        return h[0], (h, c)

    def _pack(self, ints: torch.Tensor, dense: torch.Tensor, lengths: torch.Tensor) -> PackedSequence:
        """Embed the events straight into packed order; no [T, B] grid is ever built.

        With Zipf-distributed users one batch mixes a heavy user's hundreds of
        events with a thousand users' single events, so a padded grid is
        mostly padding.  Packed order is what ``pack_padded_sequence(enforce_sorted=False)``
        produces: users sorted by length (descending, stable), events time-major.
        """
        lengths = lengths.cpu()
        order = torch.sort(lengths, descending=True, stable=True).indices
        sorted_lengths = lengths[order]
        first_row = torch.cumsum(lengths, 0) - lengths                       # of each user, user-major
        sorted_first = torch.cumsum(sorted_lengths, 0) - sorted_lengths       # of each user, sorted
        step = torch.arange(int(sorted_lengths.sum())) - torch.repeat_interleave(sorted_first, sorted_lengths)
        rows = torch.repeat_interleave(first_row[order], sorted_lengths) + step   # sorted users' rows, in order
        packed = rows[torch.sort(step, stable=True).indices].to(ints.device)
        order_dev = order.to(ints.device)
        return PackedSequence(self.embed(ints[packed], dense[packed]), torch.bincount(step),
                              order_dev, torch.argsort(order_dev))

    # -- heads ----------------------------------------------------------------

    def intent_logits(self, h: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
        """Next-type logits from h plus a linear read of the user's wide features [M, len(WIDE_FEATURES)]
        (log type shares -- the counts baseline --, time since each type, session counts, the latest
        item's and category's history).  The wide path starts at zero and learns how much of those
        plain counters to add to what the LSTM makes of the sequence."""
        return self.intent_head(self.drop(h)) + self.wide_head(wide)

    def profile(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.profile_head(self.drop(h)), dim=-1)

    def category_scores(self, h: torch.Tensor, profile: torch.Tensor, cand_buckets: torch.Tensor,
                        cand_features: torch.Tensor, cand_valid: torch.Tensor,
                        vocab_vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the M users' C remembered categories [M, C] (-inf for empty slots) and of the
        V vocabulary entries [M, V] (not yet excluding the ones the user remembers).

        Inference passes ``vocab_vectors`` computed once: with frozen weights they
        never change, and recomputing them cost a tenth of a small online batch."""
        query = profile * self.logit_scale
        cand_vec = self.category_vectors(cand_buckets)                          # [M, C, D]
        rank = self.rank_emb.weight.unsqueeze(0).expand(h.shape[0], -1, -1)      # [M, C, 8]
        ctx = self.cand_ctx(self.drop(h)).unsqueeze(1).expand(-1, cand_buckets.shape[1], -1)
        memory = (cand_vec @ query.unsqueeze(-1)).squeeze(-1) + self.cand_mlp(
            torch.cat([cand_features, rank, ctx], dim=-1)).squeeze(-1)
        memory = memory.masked_fill(~cand_valid, float("-inf"))
        if vocab_vectors is None:
            vocab_vectors = self.vocab_vectors()
        vocab = torch.addmm(self.vocab_bias, query, vocab_vectors.T)             # [M, V]
        return memory, vocab

    def category_logits(self, h: torch.Tensor, profile: torch.Tensor, cand_buckets: torch.Tensor,
                        cand_features: torch.Tensor, cand_valid: torch.Tensor,
                        cand_vocab: torch.Tensor) -> torch.Tensor:
        """Training scores [M, C + V]: remembered categories, then the vocabulary.

        Vocabulary entries the user remembers (``cand_vocab`` = their vocab
        index or -1) get -inf, so every real category appears exactly once.
        """
        memory, vocab = self.category_scores(h, profile, cand_buckets, cand_features, cand_valid)
        taken = torch.zeros_like(vocab).scatter_add_(
            1, cand_vocab.clamp(min=0), (cand_valid & (cand_vocab >= 0)).to(vocab.dtype))
        return torch.cat([memory, vocab.masked_fill(taken > 0, float("-inf"))], dim=1)

    def top_categories(self, h: torch.Tensor, profile: torch.Tensor, cand_buckets: torch.Tensor,
                       cand_features: torch.Tensor, cand_valid: torch.Tensor, cand_vocab: torch.Tensor,
                       k: int, vocab_vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top k of :meth:`category_logits` as (indices into [C + V], scores), each [M, k].

        Same ranking without a full masking pass over [M, V]: only the few
        remembered vocabulary entries are overwritten.
        """
        memory, vocab = self.category_scores(h, profile, cand_buckets, cand_features, cand_valid, vocab_vectors)
        taken = cand_valid & (cand_vocab >= 0)
        # min-reduce -inf into remembered entries, +inf (a no-op) elsewhere: no mask pass, no device sync
        vocab.scatter_reduce_(1, cand_vocab.clamp(min=0), torch.where(taken, float("-inf"), float("inf")), "amin")
        capacity = memory.shape[1]
        best = torch.topk(vocab, min(k, vocab.shape[1]), dim=1)
        top = torch.topk(torch.cat([memory, best.values], dim=1), min(k, capacity + best.values.shape[1]), dim=1)
        vocab_index = best.indices.gather(1, (top.indices - capacity).clamp(min=0))
        return torch.where(top.indices >= capacity, capacity + vocab_index, top.indices), top.values
