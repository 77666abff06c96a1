"""Object tracks across the windows of a long video (born, continued, ended), not query slots.

A query slot of a window model is not an object: over a long video one slot holds a visitor, then
nothing, then the next visitor. Making one track per slot merges those objects into one track
whose video IoU with each of them is low. `TrackBuilder` makes tracks that are objects:

* a track is **born** when a query of a window is confident (best class probability >=
  `birth_score`) and continues no live track;
* it **continues** while Hungarian matching (scipy) pairs it with a query of the next window at an
  association cost <= `max_cost` whose best class probability is >= `keep_score`; the cost is
  `embed_weight * (1 - cos(embeddings)) + mask_weight * (1 - soft Dice)` of the sigmoid mask
  logits on the frames both windows cover (for a track absent from the previous window: its last
  present frame against the window's first frames);
* it **ends** after `patience` consecutive windows without a match; its mask is empty on the
  frames of the windows where it is absent, and its class probabilities are the mean over the
  windows where it is present, weighted by the new frames each adds.

A video that fits in one window makes every query a track (the official whole-video inference,
exactly). Without association (`associate=False`) query q of every window feeds track q (the
slot tracks of before). Per track the builder keeps only what association needs (the embedding
and the mask logits of its last present window) and the per-frame RLEs of its masks; ended tracks
go to `ClosedTracks` (a spool file), so host memory is bounded by the live tracks.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile

import numpy as np
from scipy import optimize

# An infeasible pair in the assignment (finite: scipy rejects an all-infinite row).
_INFEASIBLE = 1e6


@dataclasses.dataclass(frozen=True)
class TrackSettings:
  """The track rules (`config.eval.track_*`; see the module docstring).

  Attributes:
    associate: match tracks to queries across windows (False: query q is track q).
    embed_weight: weight of the query-embedding cosine distance in the cost.
    mask_weight: weight of the mask disagreement (1 - soft Dice) in the cost.
    birth_score: least best-class probability of an unmatched query that starts a track.
    keep_score: least best-class probability of a query that continues a track.
    max_cost: largest association cost of a continuation.
    patience: windows a track may miss before it ends.
  """

  associate: bool = True
  embed_weight: float = 1.0
  mask_weight: float = 1.0
  birth_score: float = 0.5
  keep_score: float = 0.2
  max_cost: float = 1.0
  patience: int = 2


@dataclasses.dataclass
class Track:
  """One object track while it is live.

  Attributes:
    track_id: its id (0, 1, ... in order of birth).
    first_frame: the frame its RLEs start at.
    rles: RLE counts (bytes) of its mask on frames first_frame, first_frame + 1, ...; None where
      it is absent (an empty mask).
    score_sum: float64 [C] class probabilities summed over its present windows, weighted by the
      new frames each adds.
    present_frames: the weights' sum.
    embed: float32 [D] its query embedding in its last present window (None without association).
    logits: float32 [W, h, w] its mask logits in its last present window.
    window_start: that window's first frame.
    missed: windows missed since then.
  """

  track_id: int
  first_frame: int
  score_sum: np.ndarray
  embed: np.ndarray | None
  logits: np.ndarray
  window_start: int
  rles: list = dataclasses.field(default_factory=list)
  present_frames: int = 0
  missed: int = 0

  @property
  def scores(self) -> np.ndarray:
    """float32 [C] class probabilities over the windows where it is present."""
    return (self.score_sum / max(self.present_frames, 1)).astype(np.float32)

  def add_rles(self, first: int, counts: list[bytes]) -> None:
    """Appends the RLE counts of frames [first, first + n) (absent frames before: None)."""
    self.rles.extend([None] * (first - self.first_frame - len(self.rles)))
    self.rles.extend(counts)


class ClosedTracks:
  """Ended tracks, written to a temporary spool file (JSON lines); their scores stay in memory.

  Attributes:
    scores: {track id: float32 [C] class probabilities}.
  """

  def __init__(self):
    self._file = tempfile.TemporaryFile("w+b")
    self._offsets = {}  # track id -> byte offset of its line
    self.scores = {}

  def add(self, track: Track) -> None:
    self._file.seek(0, 2)
    self._offsets[track.track_id] = self._file.tell()
    rles = [None if c is None else c.decode("utf-8") for c in track.rles]
    self._file.write(json.dumps([track.first_frame, rles]).encode("utf-8") + b"\n")
    self.scores[track.track_id] = track.scores

  def rles(self, track_id: int, num_frames: int, empty: str) -> list[str]:
    """A track's RLE counts (str) on every frame of the video; `empty` where it is absent."""
    self._file.seek(self._offsets[track_id])
    first_frame, rles = json.loads(self._file.readline())
    rles = [empty] * first_frame + [empty if c is None else c for c in rles]
    return rles + [empty] * (num_frames - len(rles))

  def close(self) -> None:
    self._file.close()


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (np.tanh(0.5 * np.asarray(x, np.float32)) + 1.0)


def soft_dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Soft Dice (+1 smoothing) of mask probabilities [N, ...] and [Q, ...]: float32 [N, Q]."""
  a = a.reshape(a.shape[0], -1)
  b = b.reshape(b.shape[0], -1)
  return (2.0 * a @ b.T + 1.0) / (a.sum(-1)[:, None] + b.sum(-1)[None, :] + 1.0)


class TrackBuilder:
  """Host-side tracks across the windows of one video (see the module docstring).

  Example:
    builder = TrackBuilder(TrackSettings())
    for start, probabilities, logits, embeds, last in windows:
      first, tracks, new_logits = builder.add(start, probabilities, logits, embeds, last)
      ... resize new_logits [N, n, h, w], RLE-encode, tracks[i].add_rles(first, counts) ...
    closed = builder.finish()
  """

  def __init__(self, settings: TrackSettings):
    self.settings = settings
    self.live: list[Track] = []
    self.closed = ClosedTracks()
    self.covered = 0  # frames emitted so far
    self.num_windows = 0
    self._next_id = 0

  def add(
      self,
      start: int,
      probabilities: np.ndarray,
      mask_logits: np.ndarray,
      embeds: np.ndarray | None,
      last: bool,
  ) -> tuple[int, list[Track], np.ndarray]:
    """Adds the window [start, start + W) of the video.

    Args:
      start: its first frame (<= the frames emitted so far).
      probabilities: float32 [Q, C] class probabilities of its queries.
      mask_logits: float32 [Q, W, h, w] their mask logits.
      embeds: float32 [Q, D] their embeddings (needed when associating).
      last: whether it is the video's last window.

    Returns:
      (first new frame, the N tracks present in this window, float32 [N, n, h, w] their mask
      logits on the n frames this window adds).
    """
    probabilities = np.asarray(probabilities, np.float32)
    mask_logits = np.asarray(mask_logits, np.float32)
    first = self.covered
    new_frames = start + mask_logits.shape[1] - first
    if self.num_windows == 0 and last:
      # One window covers the video: every query is a track (the official inference; the
      # whole-video path computes no embeddings).
      matches, born = {}, list(range(len(probabilities)))
    else:
      if self.settings.associate and embeds is None:
        raise ValueError("associating windows needs the model output 'pred_embeds' [B, Q, D]")
      matches, born = self._associate(start, probabilities, mask_logits, embeds)
    present = []
    for track_index, query in sorted(matches.items()):
      present.append((self.live[track_index], query))
    for query in born:
      present.append((self._birth(first, probabilities.shape[1]), query))
    matched = {id(track) for track, _ in present}
    for track in self.live:
      if id(track) not in matched:
        track.missed += 1
    for track, query in present:
      track.score_sum += probabilities[query].astype(np.float64) * new_frames
      track.present_frames += new_frames
      track.missed = 0
      track.embed = None if embeds is None else np.asarray(embeds[query], np.float32)
      track.logits, track.window_start = mask_logits[query], start
    self._close_missing()
    self.num_windows += 1
    self.covered = start + mask_logits.shape[1]
    queries = np.asarray([query for _, query in present], np.int64)
    return first, [track for track, _ in present], mask_logits[queries][:, first - start :]

  def _birth(self, first: int, num_classes: int) -> Track:
    track = Track(
        track_id=self._next_id,
        first_frame=first,
        score_sum=np.zeros(num_classes, np.float64),
        embed=None,
        logits=np.zeros((0,), np.float32),
        window_start=first,
    )
    self._next_id += 1
    self.live.append(track)
    return track

  def _associate(self, start, probabilities, mask_logits, embeds):
    """({live track index: query}, [queries born]) of a window after the first."""
    best = probabilities.max(axis=1)
    if not self.settings.associate:
      if self.num_windows == 0:
        return {}, list(range(len(probabilities)))
      return {i: i for i in range(len(self.live))}, []
    matches = {}
    if self.live:
      cost = self.cost(start, mask_logits, embeds)
      cost = np.where(best[None, :] >= self.settings.keep_score, cost, _INFEASIBLE)
      for row, col in zip(*optimize.linear_sum_assignment(cost)):
        if cost[row, col] <= self.settings.max_cost:
          matches[int(row)] = int(col)
    taken = set(matches.values())
    born = [q for q in range(len(best)) if q not in taken and best[q] >= self.settings.birth_score]
    return matches, born

  def cost(self, start: int, mask_logits: np.ndarray, embeds: np.ndarray) -> np.ndarray:
    """float32 [N, Q] association cost of the live tracks with the window's queries.

    The mask term compares the frames a track's last present window shares with this one
    (when it ran just before, the overlap); for a track that missed windows (or without
    overlap), its last frame against this window's first frame.
    """
    s = self.settings
    track_embeds = np.stack([t.embed for t in self.live])
    cost = s.embed_weight * (1.0 - _unit(track_embeds) @ _unit(embeds).T)
    shared = [t.window_start + t.logits.shape[0] - start for t in self.live]
    overlap = min(shared)
    if overlap <= 0 or any(t.missed for t in self.live):
      overlap = 1
    references = []
    for track, track_shared in zip(self.live, shared):
      if track.missed or track_shared < overlap:
        references.append(np.repeat(track.logits[-1:], overlap, axis=0))
      else:
        references.append(track.logits[start - track.window_start :][:overlap])
    dice = soft_dice(_sigmoid(np.stack(references)), _sigmoid(mask_logits[:, :overlap]))
    return (cost + s.mask_weight * (1.0 - dice)).astype(np.float32)

  def _close_missing(self) -> None:
    keep = []
    for track in self.live:
      if track.missed > self.settings.patience:
        self.closed.add(track)
      else:
        keep.append(track)
    self.live = keep

  def finish(self) -> ClosedTracks:
    """Ends every live track; returns all tracks of the video."""
    for track in self.live:
      self.closed.add(track)
    self.live = []
    return self.closed
