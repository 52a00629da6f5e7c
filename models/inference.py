"""The model as the stream sees it: load a checkpoint, advance users, (de)serialise state.

``ProfileModel.advance`` is the online path (one batched LSTM call for B users
and their new events; ``prepare_advance`` splits it into its Python and its
torch part, so the stream can run the torch part in a thread of its own);
``ProfileModel.replay`` is the offline ground truth (all
of each user's events through ``forward``).  Both share the featurizer and
the heads, so they agree to float rounding -- the tests hold them to 1e-5.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import pathlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from models import state as state_codec
from models.checkpoint import CheckpointError, ModelConfig, load_checkpoint
from models.events import EVENT_TYPES, Event
from models.features import Candidates, FeatureBatch, Featurizer, Vocabulary, category_buckets, padded_index
from models.model import ProfileLSTM
from models.state import UserState

log = logging.getLogger(__name__)

#: Rows per head evaluation in replay: bounds the [rows, C + V] score matrix.
_HEAD_CHUNK = 4096
#: Events per forward call in replay.
_REPLAY_EVENTS_PER_BATCH = 32_768


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic GC while a batch allocates thousands of small objects.

    Users' memories are small lists; building a batch of them triggers many
    generation scans that find nothing (the objects hold no cycles), which
    dominated ``advance`` on large batches.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def default_checkpoint_path() -> pathlib.Path:
    """The checkpoint shipped in the repository (trained by `profilestream train`, see README)."""
    return pathlib.Path(__file__).resolve().parent / "default_checkpoint.pt"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" = the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class StepResult:
    """Outputs right after each user's last new event, in the order of the ``advance`` call."""

    states: list[UserState]
    intent: np.ndarray                  # float32 [B, len(EVENT_TYPES)], rows sum to 1
    profile: np.ndarray                 # float32 [B, profile_dim], L2-normalised
    top_categories: list[list[str]]     # up to top_k real category ids per user, best first
    #: Wall seconds of the recurrent step and of the heads (on CUDA the step's kernels are only
    #: queued in the first, and waited for in the second, which ends with the one host copy).
    step_seconds: float = 0.0
    heads_seconds: float = 0.0


@dataclass
class SequenceOutputs:
    """Outputs after each of M events (or of one user's events, in order)."""

    intent: np.ndarray
    profile: np.ndarray
    top_categories: list[list[str]]


class ProfileModel:
    """A loaded checkpoint, ready to advance users' states."""

    def __init__(self, config: ModelConfig, net: ProfileLSTM, fingerprint: str, device: torch.device) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.version = config.version
        self.device = device
        self.profile_dim = config.dims.profile_dim
        self.top_k = config.top_k
        self.net = net.to(device).eval()
        d = config.dims
        self.featurizer = Featurizer(d.cat_buckets, d.item_buckets, d.price_buckets, d.cat_capacity,
                                     config.item_capacity, config.baselines["type_prior"])
        self.vocab = Vocabulary(config.vocab)
        with torch.no_grad():
            self._vocab_vectors = self.net.vocab_vectors()
            self._h0 = net.h0.detach().cpu().numpy().copy()
            self._c0 = net.c0.detach().cpu().numpy().copy()

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> "ProfileModel":
        """Load and verify a checkpoint (:class:`CheckpointError` with the reason if it cannot be used)."""
        config, weights, fp = load_checkpoint(path)
        net = build_network(config)
        try:
            net.load_state_dict(weights)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not match its config: {err}") from err
        dev = resolve_device(device)
        if dev.type == "cuda":
            # cuDNN RNNs default to TF32, which would break advance == replay (1e-5) across devices.
            torch.backends.cudnn.rnn.fp32_precision = "ieee"
        log.info("loaded model %s (%s) on %s", fp, config.version, dev)
        return cls(config, net, fp, dev)

    # -- state ----------------------------------------------------------------

    def new_state(self) -> UserState:
        """The state of a user never seen before."""
        cats, items = self.featurizer.empty_tables()
        return UserState(self._h0, self._c0, cats, items)

    def encode_state(self, state: UserState) -> bytes:
        return state_codec.encode_state(state, self.fingerprint)

    def decode_state(self, data: bytes) -> UserState:
        """Inverse of :meth:`encode_state`; :class:`StateError` on corrupt bytes or another model's state."""
        d = self.config.dims
        return state_codec.decode_state(data, self.fingerprint, d.hidden, d.cat_capacity, self.config.item_capacity)

    def encode_states(self, states: Sequence[UserState]) -> list[bytes]:
        with _gc_paused():
            return [self.encode_state(s) for s in states]

    def decode_states(self, blobs: Sequence[bytes]) -> list[UserState]:
        """Decode many states; :class:`StateError` on the first bad one."""
        with _gc_paused():
            return [self.decode_state(b) for b in blobs]

    # -- online ---------------------------------------------------------------

    def advance(self, states: Sequence[UserState | None], events: Sequence[Sequence[Event]]) -> StepResult:
        """Advance B users by their new events (in order) with one batched model call.

        ``states[i]`` None = unseen user.  Input states are not modified.
        """
        return self.prepare_advance(states, events)()

    def prepare_advance(self, states: Sequence[UserState | None],
                        events: Sequence[Sequence[Event]]) -> Callable[[], StepResult]:
        """:meth:`advance` in two parts: featurise now, and return the tensor part.

        The featurisation is Python and holds the GIL; the part returned is
        torch, which releases it, so a caller may run it in another thread
        while its own thread goes on (the stream prepares its next batch).
        """
        if len(states) != len(events):
            raise ValueError(f"{len(states)} states but {len(events)} event lists")
        if not states:
            return self._empty_result
        with _gc_paused():
            new_states = [self.new_state() if s is None else s.copy() for s in states]
            batch = self.featurizer.run(new_states, events, every_event=False)
        h0 = np.stack([s.h for s in new_states])[None]
        c0 = np.stack([s.c for s in new_states])[None]
        return functools.partial(self._step, new_states, batch, h0, c0)

    def _step(self, new_states: list[UserState], batch: FeatureBatch, h0: np.ndarray, c0: np.ndarray) -> StepResult:
        hidden = self.config.dims.hidden
        started = time.perf_counter()
        # inference_mode, not no_grad: it also skips the version counters and view tracking,
        # a few microseconds per op that add up over the heads' few dozen small ops.
        with torch.inference_mode():
            state = (self.to_device(h0), self.to_device(c0))
            h, (h_n, c_n) = self.net.step_many(state, self.to_device(batch.ints), self.to_device(batch.dense),
                                               torch.from_numpy(batch.lengths))
            stepped = time.perf_counter()
            head = self._head_tensor(h, batch.candidates)
            host = torch.cat([h_n[0], c_n[0], head], dim=1).cpu().numpy()  # the one device->host sync
        outputs = self._split_heads(host[:, 2 * hidden:], batch.candidates)
        for i, s in enumerate(new_states):
            # A row of its own per user: a view into ``host`` would keep the whole batch's
            # outputs alive for as long as any one of its users' states is kept (a cache).
            hc = host[i, :2 * hidden].copy()
            s.h, s.c = hc[:hidden], hc[hidden:]
        return StepResult(new_states, outputs.intent, outputs.profile, outputs.top_categories,
                          stepped - started, time.perf_counter() - stepped)

    def predict(self, states: Sequence[UserState]) -> StepResult:
        """Outputs of users' current states without new events: what their last ``advance`` returned."""
        if not states:
            return self._empty_result()
        cands = self.featurizer.candidates(states)
        with torch.no_grad():
            host = self._head_tensor(self.to_device(np.stack([s.h for s in states])), cands).cpu().numpy()
        out = self._split_heads(host, cands)
        return StepResult(list(states), out.intent, out.profile, out.top_categories)

    def _empty_result(self) -> StepResult:
        return StepResult([], np.zeros((0, len(EVENT_TYPES)), np.float32),
                          np.zeros((0, self.profile_dim), np.float32), [])

    # -- offline --------------------------------------------------------------

    def sequence_outputs(self, sequences: Sequence[Sequence[Event]],
                         progress: tqdm | None = None) -> list[SequenceOutputs]:
        """Outputs after every event of each full user sequence (from an unseen user's state).

        This is the ground truth: users are batched through ``forward`` over
        their whole sequences, longest first to keep padding small.
        ``progress`` counts the users done.
        """
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        results: list[SequenceOutputs | None] = [None] * len(sequences)
        start = 0
        while start < len(order):
            width = len(sequences[order[start]])
            stop = start + max(1, _REPLAY_EVENTS_PER_BATCH // max(width, 1))
            chunk = order[start:stop]
            for i, out in zip(chunk, self._forward_users([sequences[i] for i in chunk])):
                results[i] = out
            if progress is not None:
                progress.update(len(chunk))
            start = stop
        return results  # type: ignore[return-value]

    def replay(self, events: Iterable[Event]) -> Iterator[tuple[Event, dict[str, float], list[str], list[float]]]:
        """(event, intent by type, top categories, profile) right after every event, in input order."""
        events = list(events)
        by_user: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(events):
            by_user[e.user_id].append(i)
        positions = list(by_user.values())
        outputs = self.sequence_outputs([[events[i] for i in pos] for pos in positions])
        where: list[tuple[int, int]] = [(0, 0)] * len(events)
        for u, pos in enumerate(positions):
            for j, i in enumerate(pos):
                where[i] = (u, j)
        for event, (u, j) in zip(events, where):
            out = outputs[u]
            yield (event, dict(zip(EVENT_TYPES, out.intent[j].tolist())), out.top_categories[j],
                   out.profile[j].tolist())

    def _forward_users(self, sequences: list[Sequence[Event]]) -> list[SequenceOutputs]:
        states = [self.new_state() for _ in sequences]
        with _gc_paused():
            batch = self.featurizer.run(states, sequences, every_event=True)
        t_idx, b_idx = padded_index(batch.lengths)
        ints, dense = batch.padded()
        with torch.no_grad():
            out, _ = self.net(self.to_device(ints), self.to_device(dense))
            h = out[torch.from_numpy(t_idx).to(self.device), torch.from_numpy(b_idx).to(self.device)]
            heads = [self._head_tensor(h[s:s + _HEAD_CHUNK], _slice(batch.candidates, s, s + _HEAD_CHUNK))
                     for s in range(0, h.shape[0], _HEAD_CHUNK)]
            host = torch.cat(heads).cpu().numpy()
        merged = self._split_heads(host, batch.candidates)
        bounds = np.cumsum(batch.lengths)
        return [SequenceOutputs(merged.intent[a:b], merged.profile[a:b], merged.top_categories[a:b])
                for a, b in zip(bounds - batch.lengths, bounds)]

    # -- shared heads ---------------------------------------------------------

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def candidate_tensors(self, cands: Candidates) -> tuple[torch.Tensor, ...]:
        """(buckets, features, valid, vocab index, wide features) tensors on the model's device."""
        return (self.to_device(category_buckets(cands.keys, self.config.dims.cat_buckets)),
                self.to_device(cands.features), self.to_device(cands.valid),
                self.to_device(self.vocab.index(cands.keys)), self.to_device(cands.wide))

    def _head_tensor(self, h: torch.Tensor, cands: Candidates) -> torch.Tensor:
        """[M, types + D + 2K] float tensor: intent, profile, top-K indices, top-K scores (one transfer)."""
        net = self.net
        *memory, wide = self.candidate_tensors(cands)
        profile = net.profile(h)
        top_idx, top_scores = net.top_categories(h, profile, *memory, self.top_k, self._vocab_vectors)
        intent = torch.softmax(net.intent_logits(h, wide), dim=1)
        return torch.cat([intent, profile, top_idx.to(h.dtype), top_scores], dim=1)

    def _split_heads(self, host: np.ndarray, cands: Candidates) -> SequenceOutputs:
        n_types, dim = len(EVENT_TYPES), self.profile_dim
        k = (host.shape[1] - n_types - dim) // 2
        top_idx = host[:, n_types + dim:n_types + dim + k].astype(np.int64)
        finite = np.isfinite(host[:, n_types + dim + k:])
        capacity, vocab = cands.keys.shape[1], self.config.vocab
        names = [[labels[j] if j < capacity else vocab[j - capacity] for j, ok in zip(row, ok_row) if ok]
                 for labels, row, ok_row in zip(cands.labels, top_idx.tolist(), finite.tolist())]
        return SequenceOutputs(np.ascontiguousarray(host[:, :n_types]),
                        np.ascontiguousarray(host[:, n_types:n_types + dim]), names)


def build_network(config: ModelConfig) -> ProfileLSTM:
    """A fresh (untrained) network shaped by ``config``."""
    keys = Vocabulary(config.vocab).keys
    return ProfileLSTM(config.dims, torch.from_numpy(category_buckets(keys, config.dims.cat_buckets)).reshape(-1, 2))


def _slice(cands: Candidates, start: int, stop: int) -> Candidates:
    return Candidates(cands.keys[start:stop], cands.features[start:stop], cands.valid[start:stop],
                      cands.labels[start:stop], cands.wide[start:stop])
