"""Lossless delta updates: per bucket, only the elements whose bits changed since the last version every receiver
holds (`weight_sync.delta`).

At GRPO's learning rates most bf16 values do not change from one step to the next (AdamW at lr 1e-6: a few per
cent of them), so a version can travel as, per bucket, the indices and new bits of the changed elements instead of
the whole bucket. Both ends keep the last version's packed buckets: the learner's `DeltaEncoder` (on the learner's
device) to compare the new version against, a receiver's `DeltaDecoder` (in host memory) to apply it to; the
decoder's buckets are what the engine loads, so the engine side is unchanged.

A payload is one bucket of a version, one of two kinds:
- `RAW`: the packed bucket itself (a full version, or a bucket where too much changed: `max_changed`);
- `DELTA`: `[count: int64][indices: int32 x count][pad to 8 bytes][values: word x count]`, where a word is one
  element of the bucket's dtype compared as raw bits (so -0.0 vs 0.0 and NaN payloads count as changes and
  nothing is lost).

The wire (collective.py, shm.py, cuda_ipc.py) announces a version's `base`: the version a delta applies to. A
receiver that does not hold exactly that base (new, restarted, behind, another layout) refuses before any payload
moves, and the sender sends the version full instead; nothing is ever applied to the wrong base.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from protos import WeightsManifest
from runtime.weights.layout import WeightSyncError, bucket_views, dtype_from_name, pack_bucket

RAW, DELTA = 0, 1
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_HEAD = 8  # the int64 count that opens a DELTA payload
SAMPLE_STRIDE = (
    61  # every 61st element estimates a bucket's changed fraction (prime: no row length aligns with it)
)


def layout_key(manifest: WeightsManifest) -> tuple:
    """What must be equal for a delta to apply: every bucket's size and every tensor's place (not the version)."""
    return (tuple(manifest.bucket_nbytes), tuple(manifest.tensors))


def word_dtype(manifest: WeightsManifest, bucket: int) -> torch.dtype:
    """The integer type a bucket's elements are compared as: its tensors' dtype, bit for bit."""
    spec = next((t for t in manifest.tensors if t.bucket == bucket), None)
    size = dtype_from_name(spec.dtype).itemsize if spec is not None else 1
    return _WORDS[size]


def delta_nbytes(count: int, word: torch.dtype) -> int:
    """Size of a DELTA payload of `count` changed elements."""
    return -(-(_HEAD + 4 * count) // 8) * 8 + count * word.itemsize


def encode_delta(
    base: torch.Tensor, cur: torch.Tensor, word: torch.dtype, limit: int
) -> tuple[torch.Tensor | None, int]:
    """(DELTA payload from `base` to `cur`, changed count), or (None, count) when the payload would be larger than
    `limit` bytes (the count then estimated from a sample when the sample already shows it). `base` is brought to
    `cur` either way (only the changed elements are written)."""
    a, b = base.view(word), cur.view(word)
    sampled = (
        a[::SAMPLE_STRIDE] != b[::SAMPLE_STRIDE]
    )  # a large change shows in a sample: skip the full compare
    estimate = int(torch.count_nonzero(sampled)) * a.numel() // max(1, sampled.numel())
    if delta_nbytes(estimate, word) > limit:
        base.copy_(cur)
        return None, estimate
    idx = (a != b).nonzero().squeeze(1)  # (count,) int64; counting first would cost another pass
    count = idx.numel()
    if delta_nbytes(count, word) > limit:
        base.copy_(cur)
        return None, count
    vals = b.index_select(0, idx)
    a.index_copy_(0, idx, vals)
    out = torch.empty(delta_nbytes(count, word), dtype=torch.uint8, device=cur.device)
    out[:_HEAD].view(torch.int64)[0] = count
    out[_HEAD : _HEAD + 4 * count].view(torch.int32).copy_(idx)
    out[out.numel() - count * word.itemsize :].view(word).copy_(vals)
    return out, count


def apply_delta(shadow: torch.Tensor, payload: torch.Tensor, word: torch.dtype) -> int:
    """Write a DELTA payload into `shadow` (the base bucket, same device as the payload or the CPU); returns the
    changed count. A payload whose length does not match its count is refused (WeightSyncError)."""
    payload = payload.to(shadow.device)
    if payload.numel() < _HEAD:
        raise WeightSyncError(f"a delta payload of {payload.numel()} bytes is shorter than its header")
    count = int(payload[:_HEAD].view(torch.int64)[0])
    if count < 0 or payload.numel() != delta_nbytes(count, word):
        raise WeightSyncError(
            f"a delta payload of {payload.numel()} bytes does not hold {count} changed {word} elements"
        )
    idx = payload[_HEAD : _HEAD + 4 * count].view(torch.int32).long()
    vals = payload[payload.numel() - count * word.itemsize :].view(word)
    s = shadow.view(word)
    if count and int(idx.max()) >= s.numel():
        raise WeightSyncError(f"a delta index {int(idx.max())} is outside its bucket of {s.numel()} elements")
    s.index_copy_(0, idx, vals)
    return count


@dataclass
class DeltaStats:
    """What the encoder did for one version: the figures of the weight-sync metrics."""

    base: int | None = None  # the version the deltas apply to; None: sent full
    payload_bytes: int = 0
    full_bytes: int = 0
    changed: int = 0  # elements that changed, over the buckets that were compared
    compared: int = 0  # elements compared
    encode_s: float = 0.0
    raw_buckets: list[int] = field(default_factory=list)

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.compared if self.compared else 1.0


class DeltaEncoder:
    """The learner's side: the last published version's buckets, and the choice between a delta and a full version.

    `begin(manifest, version, fresh)` picks the base (None: full): a full version when there is no acknowledged base
    (first send, a failed send, a new generation of receivers: `fresh`), every `full_every` versions, and for a few
    versions after one whose changed fraction exceeded `max_changed` (the fallback: at large changes a delta costs
    a comparison and saves nothing). `payload(i, tensors)` packs bucket i and returns (kind, payload); `commit()`
    once every receiver acknowledged the version, `invalidate()` when a send failed."""

    def __init__(self, max_changed: float = 0.1, full_every: int = 50):
        self.max_changed, self.full_every = max_changed, full_every
        self._base: list[torch.Tensor] = []  # the last sent version's packed buckets
        self._scratch: torch.Tensor | None = None  # a bucket being packed before it is compared
        self._layout: tuple | None = None
        self._acked: int | None = None  # version of _base every receiver acknowledged
        self._since_full = 0
        self._skip, self._backoff = 0, 1  # full versions left before comparing again; the next backoff
        self.stats = DeltaStats()
        self._manifest: WeightsManifest | None = None

    def begin(self, manifest: WeightsManifest, fresh: bool = False) -> int | None:
        """Start a version; returns its base (the version its deltas apply to) or None for a full version."""
        same = self._layout == layout_key(manifest)
        base = self._acked if (same and not fresh) else None
        if base is not None and (self._since_full + 1 >= self.full_every or self._skip > 0):
            self._skip = max(0, self._skip - 1)
            base = None
        self._manifest, self._acked = manifest, None
        if not same:
            self._base, self._layout = [], layout_key(manifest)
        self.stats = DeltaStats(base=base, full_bytes=manifest.total_bytes)
        return base

    def _current(self, manifest: WeightsManifest) -> None:
        """A send left behind by an abandoned generation (gloo cannot abort its blocked call) must not touch the
        buckets of the version sent since: they are the next delta's base."""
        if manifest is not self._manifest:
            raise WeightSyncError(f"version {manifest.version}'s send was superseded by a newer one")

    def full(self, manifest: WeightsManifest) -> None:
        """The version goes full after all (a receiver refused its base)."""
        self._current(manifest)
        self.stats.base = None

    def payload(
        self, manifest: WeightsManifest, index: int, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[int, torch.Tensor]:
        """Pack bucket `index` and return (RAW, the bucket) or (DELTA, the changed elements). Once one bucket of a
        version changed too much, the rest go RAW without comparing: a large change is rarely confined to one."""
        self._current(manifest)
        m, t0 = manifest, time.perf_counter()
        n = m.bucket_nbytes[index]
        if self.stats.base is None or self.stats.raw_buckets or index >= len(self._base):
            out = self._base[index] if index < len(self._base) else None
            buf = pack_bucket(m, index, tensors, out)
            self._base[index : index + 1] = [buf]
            self.stats.payload_bytes += n
            return RAW, buf
        scratch = self._scratch if self._scratch is not None and self._scratch.numel() >= n else None
        cur = pack_bucket(m, index, tensors, scratch)
        self._scratch = cur if scratch is None else scratch
        word = word_dtype(m, index)
        limit = min(delta_nbytes(int(self.max_changed * n / word.itemsize), word), n - 1)
        delta, count = encode_delta(self._base[index], cur, word, limit)
        self.stats.changed += count
        self.stats.compared += n // word.itemsize
        self.stats.encode_s += time.perf_counter() - t0
        if delta is None:
            self.stats.raw_buckets.append(index)
            self.stats.payload_bytes += n
            return RAW, self._base[index]
        self.stats.payload_bytes += delta.numel()
        return DELTA, delta

    def commit(self, manifest: WeightsManifest) -> None:
        """Every receiver holds the version: later versions may be deltas against it."""
        self._current(manifest)
        self._acked = manifest.version
        full = self.stats.base is None
        self._since_full = 0 if full else self._since_full + 1
        if not full and self.stats.changed_fraction > self.max_changed:
            self._skip, self._backoff = self._backoff, min(2 * self._backoff, self.full_every)
        elif not full:
            self._backoff = 1

    @property
    def acked(self) -> int | None:
        """The version every receiver acknowledged (the base of the next delta), None when there is none."""
        return self._acked

    def invalidate(self, manifest: WeightsManifest) -> None:
        """A send failed: no receiver is known to hold the buckets, the next version goes full (a superseded send
        changes nothing: the version sent since is the encoder's)."""
        if manifest is self._manifest:
            self._acked = None

    @property
    def nbytes(self) -> int:
        """Bytes the encoder holds (the last version and one bucket being packed): what `segr1 plan` counts."""
        held = sum(b.numel() for b in self._base)
        return held + (self._scratch.numel() if self._scratch is not None else 0)


class DeltaDecoder:
    """A receiver's side: the last version it received, as the manifest's packed buckets in host memory; each
    version is applied to them and the engine loads from them. Where CUDA is available the buckets are pinned: an
    engine on the GPU copies the whole version from them at every load."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.pin = self.device.type == "cpu" and torch.cuda.is_available()
        self.version = -1  # the version the buckets hold; -1: none (or a version cut half-way)
        self._buckets: list[torch.Tensor] = []
        self._layout: tuple | None = None
        self.decode_s = 0.0

    def holds(self, manifest: WeightsManifest, base: int) -> bool:
        """Whether a delta against `base` in this layout applies here."""
        return self.version == base and self._layout == layout_key(manifest)

    def begin(self, manifest: WeightsManifest, delta: bool) -> None:
        """Start receiving a version (delta: against the buckets held, which `holds` checked)."""
        if delta and not self.holds(manifest, self.version):
            raise WeightSyncError("a delta version began on a decoder that does not hold its base")
        self.version = -1  # until its last bucket is applied
        self.decode_s = 0.0
        if not delta and self._layout != layout_key(manifest):
            self._buckets = [
                torch.zeros(n, dtype=torch.uint8, device=self.device, pin_memory=self.pin)
                for n in manifest.bucket_nbytes
            ]
            self._layout = layout_key(manifest)
        self._manifest = manifest

    def bucket(self, index: int) -> torch.Tensor:
        """The held bucket `index` (a RAW payload may be received straight into it)."""
        return self._buckets[index]

    def apply(self, index: int, kind: int, payload: torch.Tensor) -> torch.Tensor:
        """Apply bucket `index`'s payload; returns the held bucket (what the engine loads)."""
        t0 = time.perf_counter()
        shadow = self._buckets[index]
        if kind == RAW:
            if payload.numel() != shadow.numel():
                raise WeightSyncError(
                    f"bucket {index}: a full payload of {payload.numel()} bytes for a bucket of {shadow.numel()}"
                )
            if payload.data_ptr() != shadow.data_ptr():
                shadow.copy_(payload)
        elif kind == DELTA:
            apply_delta(shadow, payload, word_dtype(self._manifest, index))
        else:
            raise WeightSyncError(f"bucket {index}: unknown payload kind {kind} (protocol mismatch?)")
        self.decode_s += time.perf_counter() - t0
        return shadow

    def finish(self, version: int) -> None:
        self.version = version

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buckets)


@dataclass
class DeltaExport:
    """A version for the object store (`weight_sync.backend: object-store`, and the catch-up of new workers) with
    `weight_sync.delta`: its manifest (as JSON), its base (None: every payload RAW) and one (kind, payload) per
    bucket, all on the CPU. Plain data: Ray pickles it into the object store."""

    manifest: dict
    base: int | None
    payloads: list[tuple[int, torch.Tensor]]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])


def export_version(
    encoder: DeltaEncoder, manifest: WeightsManifest, tensors: Mapping[str, torch.Tensor], base: int | None
) -> DeltaExport:
    """The encoder's version `manifest` as a DeltaExport: deltas against `base` when the encoder holds exactly that
    version (what every worker holds, per the caller), else whole. The encoder then holds this version."""
    got = encoder.begin(manifest, fresh=base is None or base != encoder.acked)
    payloads = []
    for i in range(len(manifest.bucket_nbytes)):
        kind, payload = encoder.payload(manifest, i, tensors)
        payloads.append((kind, payload.to("cpu", copy=True)))  # the encoder changes its own buckets later
    encoder.commit(manifest)
    return DeltaExport(manifest.model_dump(mode="json"), got, payloads)


def apply_export(decoder: DeltaDecoder, export: DeltaExport) -> list[tuple[str, torch.Tensor]] | None:
    """The tensors of `export` applied to the decoder's buckets (views into them), or None when it is a delta
    against a version the decoder does not hold (the sender must send it whole)."""
    manifest = WeightsManifest.model_validate(export.manifest)
    if export.base is not None and not decoder.holds(manifest, export.base):
        return None
    decoder.begin(manifest, delta=export.base is not None)
    held = [decoder.apply(i, kind, payload) for i, (kind, payload) in enumerate(export.payloads)]
    decoder.finish(manifest.version)
    return bucket_views(manifest, held)
