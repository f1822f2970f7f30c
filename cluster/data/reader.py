"""Streaming reads of data sets stored as Parquet shards in `protos.DATASET_SCHEMA`.

`DatasetReader` (training): an endless stream of `Sample`s.
- Global row order: the shards sorted by file name, rows in file order. Epoch `e` visits the permutation of that
  order drawn from `SeedSequence([seed, e])` (or the order itself with `shuffle=False`).
- Worker `k` of `K` (`shard_index`, `num_shards`) takes positions `k, k+K, k+2K, ...` of each epoch's order, so
  the workers together cover every row exactly once per epoch.
- The cursor `(epoch, position)` (`state_dict()` / `load_state_dict()`, JSON-serialisable) says where the next
  batch starts; a reader restored from it continues with exactly the rows the saved one would have returned.
- Rows are read one Parquet row group at a time, through a small LRU cache (`cache_bytes`), never the whole set.
- A corrupt row (a null or invalid field, an image or mask that does not decode, sizes that disagree with
  width/height) is reported as `<shard file> row <i>: <what>` and skipped (`on_corrupt="skip"`: counted in
  `num_corrupt`, kept in `corrupt_reports`) or raised as `CorruptSampleError` (`on_corrupt="raise"`). A skipped row
  still uses up its place in the epoch. A file that is not a readable Parquet file in the dataset schema is not a
  corrupt row: the reader refuses it when it opens (`DatasetError`).

`iter_samples` (evaluation): one pass in the global order, no shuffle, each row exactly once.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from protos.dataset import DATASET_SCHEMA, Sample
from runtime.images import CorruptSampleError, decode_sample_arrays

log = logging.getLogger(__name__)

PathLike = str | Path
CURSOR_VERSION = 1


class DatasetError(Exception):
    """The data set cannot be read at all (missing path, no shards, a file that is not a dataset shard)."""


@dataclass(frozen=True)
class CorruptReport:
    """One skipped row."""

    shard: str  # file path
    row: int  # row index inside that file, from 0
    reason: str

    def __str__(self) -> str:
        return f"{self.shard} row {self.row}: {self.reason}"


@dataclass(frozen=True)
class _Shard:
    path: Path
    num_rows: int
    group_starts: tuple[int, ...]  # first row of each row group


# ----------------------------------------------------------------------------------------------- opening


def resolve_shards(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Folders (their `*.parquet`, not recursive) and files -> sorted list of shard files; errors name the path."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise DatasetError("no data path given; pass a folder of Parquet shards or a list of .parquet files")
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            shards = sorted(p.glob("*.parquet"))
            if not shards:
                raise DatasetError(
                    f"no *.parquet shards in folder {p}; write some with `segr1 data synth --out {p}` "
                    "or `segr1 data import`"
                )
            found.extend(shards)
        elif p.is_file():
            found.append(p)
        else:
            raise DatasetError(
                f"data path {p} does not exist; make a data set with `segr1 data synth --out {p}` "
                "or point data.train / data.eval at a folder of Parquet shards"
            )
    return sorted(set(found), key=lambda q: (q.name, str(q)))


def _compatible(actual: pa.DataType, wanted: pa.DataType) -> bool:
    if actual.equals(wanted):
        return True
    if pa.types.is_string(wanted):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_binary(wanted):
        return pa.types.is_binary(actual) or pa.types.is_large_binary(actual)
    if pa.types.is_integer(wanted):
        return pa.types.is_integer(actual)
    return False


def _open_shard(path: Path) -> _Shard:
    """Read one file's footer and check its columns against DATASET_SCHEMA."""
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(
            f"{path} is not a readable Parquet file ({err}); remove it or re-create it"
        ) from None
    schema = meta.schema.to_arrow_schema()
    problems = []
    for field in DATASET_SCHEMA:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            problems.append(f"missing column {field.name!r} ({field.type})")
        elif not _compatible(schema.field(idx).type, field.type):
            problems.append(f"column {field.name!r} is {schema.field(idx).type}, expected {field.type}")
    if problems:
        raise DatasetError(
            f"{path} is not in the dataset schema (protos.dataset.DATASET_SCHEMA): {'; '.join(problems)}"
        )
    starts, total = [], 0
    for g in range(meta.num_row_groups):
        starts.append(total)
        total += meta.row_group(g).num_rows
    return _Shard(path=path, num_rows=total, group_starts=tuple(starts))


# ----------------------------------------------------------------------------------------------- rows


def row_to_sample(row: dict, where: str, validate: bool = True) -> Sample:
    """A Parquet row (dict) -> Sample; `validate` also decodes image and mask and checks their sizes.

    Raises CorruptSampleError("<where>: <what is wrong>").
    """
    nulls = [name for name in DATASET_SCHEMA.names if row.get(name) is None]
    if nulls:
        raise CorruptSampleError(f"{where}: null value in field(s) {', '.join(nulls)}")
    try:
        sample = Sample.from_row(row)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "row"
        raise CorruptSampleError(f"{where}: field {loc!r} is invalid: {first['msg']}") from None
    if validate:
        decode_sample_arrays(sample.image, sample.mask, sample.width, sample.height, where)
    return sample


class _RowSource:
    """Random access to rows by global index, one cached row group at a time."""

    def __init__(self, shards: list[_Shard], cache_bytes: int):
        self.shards = shards
        self.starts = np.cumsum([0] + [s.num_rows for s in shards])  # (num_shards + 1,)
        self.cache: OrderedDict[tuple[int, int], tuple[list[dict], int]] = OrderedDict()
        self.cache_bytes = cache_bytes
        self.cached = 0

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global row -> (shard number, row inside the shard)."""
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        return s, index - int(self.starts[s])

    def row(self, index: int) -> tuple[dict, str, int]:
        """(row dict, shard path, row inside the shard)."""
        s, r = self.locate(index)
        shard = self.shards[s]
        g = bisect.bisect_right(shard.group_starts, r) - 1
        rows = self._group(s, g)
        return rows[r - shard.group_starts[g]], str(shard.path), r

    def _group(self, s: int, g: int) -> list[dict]:
        key = (s, g)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key][0]
        try:
            table = pq.ParquetFile(self.shards[s].path).read_row_group(g, columns=DATASET_SCHEMA.names)
        except (OSError, pa.ArrowException) as err:
            raise DatasetError(f"{self.shards[s].path}: cannot read row group {g} ({err})") from None
        rows, size = table.to_pylist(), table.nbytes
        self.cache[key] = (rows, size)
        self.cached += size
        while self.cached > self.cache_bytes and len(self.cache) > 1:
            _, (_, old) = self.cache.popitem(last=False)
            self.cached -= old
        return rows


def _fingerprint(shards: list[_Shard]) -> str:
    text = ";".join(f"{s.path.name}:{s.num_rows}" for s in shards)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- training reader


class DatasetReader:
    """Endless, sharded, per-epoch shuffled stream of Samples with a resumable cursor (see module docstring)."""

    def __init__(
        self,
        paths: PathLike | Iterable[PathLike],
        *,
        seed: int = 0,
        shuffle: bool = True,
        shard_index: int = 0,
        num_shards: int = 1,
        on_corrupt: str = "skip",
        validate: bool = True,
        cache_bytes: int = 256 << 20,
        max_reports: int = 1000,
        name: str | None = None,  # for log messages; default data-<shard_index>
    ):
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(
                f"shard_index={shard_index} must be in 0..num_shards-1 (num_shards={num_shards})"
            )
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt={on_corrupt!r}; use 'skip' or 'raise'")
        self.shard_paths = resolve_shards(paths)
        self._source = _RowSource([_open_shard(p) for p in self.shard_paths], cache_bytes)
        if self._source.num_rows == 0:
            raise DatasetError(f"the shards {', '.join(map(str, self.shard_paths))} hold no rows")
        if self._source.num_rows <= shard_index:
            raise DatasetError(
                f"{self._source.num_rows} rows cannot feed worker {shard_index} of {num_shards}; "
                "use fewer workers or more data"
            )
        self.seed, self.shuffle, self.validate = int(seed), bool(shuffle), bool(validate)
        self.shard_index, self.num_shards, self.on_corrupt = shard_index, num_shards, on_corrupt
        self.max_reports = max_reports
        self.name = name or f"data-{shard_index}"
        self.corrupt_reports: list[CorruptReport] = []
        self.num_corrupt = 0
        self.epoch, self.position = 0, 0
        self._order_epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)

    @classmethod
    def from_config(
        cls, cfg, split: str = "train", shard_index: int = 0, num_shards: int = 1
    ) -> DatasetReader:
        """Reader for `cfg.data.train` (shuffled with cfg.seed) or `cfg.data.eval` (in order); cfg: TrainConfig."""
        path = cfg.data.train if split == "train" else cfg.data.eval
        if path is None:
            raise DatasetError(f"data.{split} is not set; point it at a folder of Parquet shards")
        return cls(
            path,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle and split == "train",
            shard_index=shard_index,
            num_shards=num_shards,
            on_corrupt=cfg.data.on_corrupt,
        )

    # -- sizes and order

    @property
    def num_rows(self) -> int:
        """Rows in the whole data set (all workers)."""
        return self._source.num_rows

    @property
    def rows_per_epoch(self) -> int:
        """Rows this worker visits per epoch."""
        return len(range(self.shard_index, self.num_rows, self.num_shards))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global row indices this worker visits in `epoch`, in order. # (rows_per_epoch,) int64"""
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
            order = rng.permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows, dtype=np.int64)
        return order[self.shard_index :: self.num_shards]

    def _next_index(self) -> int:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        index = int(self._order[self.position])
        self.position += 1
        if self.position == len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
        return index

    # -- reading

    def _read(self, index: int) -> Sample | None:
        """The sample at global row `index`, or None if it is corrupt and the policy is skip."""
        row, shard, r = self._source.row(index)
        where = f"{shard} row {r}"
        try:
            return row_to_sample(row, where, self.validate)
        except CorruptSampleError as err:
            if self.on_corrupt == "raise":
                raise
            self.num_corrupt += 1
            report = CorruptReport(shard, r, str(err).removeprefix(f"{where}: "))
            if len(self.corrupt_reports) < self.max_reports:
                self.corrupt_reports.append(report)
            log.warning("%s: skipping corrupt row %s", self.name, report)
            return None

    def next_batch(self, n: int) -> list[Sample]:
        """The next `n` valid samples (crossing epoch boundaries as needed); corrupt rows are skipped or raise."""
        if n < 0:
            raise ValueError(f"next_batch(n={n}): n must be >= 0")
        batch: list[Sample] = []
        corrupt_run = 0
        while len(batch) < n:
            sample = self._read(self._next_index())
            if sample is None:
                corrupt_run += 1
                if corrupt_run >= self.rows_per_epoch:
                    raise DatasetError(
                        f"every row this worker reads is corrupt ({corrupt_run} in a row); "
                        f"first report: {self.corrupt_reports[0] if self.corrupt_reports else '?'}"
                    )
                continue
            corrupt_run = 0
            batch.append(sample)
        return batch

    def __iter__(self) -> Iterator[Sample]:
        while True:
            yield from self.next_batch(1)

    # -- cursor

    def state_dict(self) -> dict:
        """The cursor, JSON-serialisable; with what it depends on, so a mismatched restore is refused."""
        return {
            "version": CURSOR_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "num_rows": self.num_rows,
            "fingerprint": _fingerprint(self._source.shards),
            "num_corrupt": self.num_corrupt,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from a saved cursor. `strict` refuses a cursor of another data set, seed or sharding."""
        if strict:
            mine = self.state_dict()
            keys = ("seed", "shuffle", "shard_index", "num_shards", "num_rows", "fingerprint")
            diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
            if diff:
                raise DatasetError(
                    "the saved data cursor belongs to another data set or sharding ("
                    + "; ".join(diff)
                    + "); resume with the same data and workers, or pass strict=False to reuse epoch/position"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.rows_per_epoch:
            raise DatasetError(
                f"data cursor epoch={epoch}, position={position} is out of range "
                f"(this worker has {self.rows_per_epoch} rows per epoch)"
            )
        self.epoch, self.position = epoch, position
        self.num_corrupt = int(state.get("num_corrupt", 0))


# ----------------------------------------------------------------------------------------------- evaluation


def iter_samples(
    paths: PathLike | Iterable[PathLike],
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    on_corrupt: str = "skip",
    validate: bool = True,
    reports: list[CorruptReport] | None = None,
) -> Iterator[Sample]:
    """One pass over the data set in the global order (no shuffle), each row once (strided across workers).

    Corrupt rows are skipped or raised by `on_corrupt`; skipped ones are appended to `reports` (if given) as they
    are met.
    """
    reader = DatasetReader(
        paths,
        shuffle=False,
        shard_index=shard_index,
        num_shards=num_shards,
        on_corrupt=on_corrupt,
        validate=validate,
        cache_bytes=0,  # sequential: keep only the current row group
        max_reports=1 << 30,
        name=f"pass-{shard_index}",
    )
    for _ in range(reader.rows_per_epoch):
        sample = reader._read(reader._next_index())
        if sample is not None:
            yield sample
        elif reports is not None:
            reports.append(reader.corrupt_reports[-1])
