"""The ratings store: one SQLite file in the rating set, one row per (rater, pair).

Every write is its own transaction, committed (WAL, synchronous=FULL) before the call returns, so
the rating page answers only after the rating is on disk: a reload, a crash or a restart loses
nothing. The primary key (rater, pair) makes a second rating of the same pair by the same rater
fail, whatever the timing; each call opens its own connection, so the web server's worker threads
(and several servers on one set) can write at once, SQLite serialising the writers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from evalsuite.ab.dimensions import CHOICES, DIMENSIONS, SCORE_MAX, SCORE_MIN, SIDES, score_field

SCORE_FIELDS = tuple(score_field(s, d) for s in SIDES for d in DIMENSIONS)
MAX_RATER_LENGTH = 64

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ratings (
    rater TEXT NOT NULL,
    pair TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ({", ".join(repr(c) for c in CHOICES)})),
    {", ".join(f"{f} INTEGER NOT NULL CHECK ({f} BETWEEN {SCORE_MIN} AND {SCORE_MAX})"
               for f in SCORE_FIELDS)},
    created TEXT NOT NULL,
    PRIMARY KEY (rater, pair)
);
CREATE TABLE IF NOT EXISTS skips (
    rater TEXT NOT NULL,
    pair TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (rater, pair)
);
"""


class AlreadyRated(Exception):
    """This rater has rated this pair before; ratings are never overwritten."""


def check_rater(name: str) -> str:
    """The rater's name, trimmed; ValueError names the problem."""
    name = " ".join(str(name).split())
    if not name:
        raise ValueError("rater name must not be empty")
    if len(name) > MAX_RATER_LENGTH:
        raise ValueError(f"rater name must be at most {MAX_RATER_LENGTH} characters, "
                         f"got {len(name)}")
    return name


@dataclass(frozen=True)
class Rating:
    """One rater's verdict on one pair: a choice and a 1-5 score per side and dimension."""

    rater: str
    pair: str
    choice: str
    scores: Mapping[str, int]
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def __post_init__(self) -> None:
        object.__setattr__(self, "rater", check_rater(self.rater))
        if not self.pair:
            raise ValueError("pair must not be empty")
        if self.choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {self.choice!r}")
        missing = [f for f in SCORE_FIELDS if f not in self.scores]
        if missing:
            raise ValueError(f"scores missing for {', '.join(missing)}")
        extra = sorted(set(self.scores) - set(SCORE_FIELDS))
        if extra:
            raise ValueError(f"unknown score fields {extra}")
        for name in SCORE_FIELDS:
            value = self.scores[name]
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not SCORE_MIN <= value <= SCORE_MAX:
                raise ValueError(f"{name} must be an integer {SCORE_MIN}-{SCORE_MAX}, "
                                 f"got {value!r}")

    def score(self, side: str, dimension: str) -> int:
        return self.scores[score_field(side, dimension)]


class RatingStore:
    """Ratings and skips of one rating set."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit: each INSERT is a transaction that is durable when execute() returns.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    def add(self, rating: Rating) -> None:
        """Store the rating; AlreadyRated if this rater rated this pair before."""
        columns = ("rater", "pair", "choice", *SCORE_FIELDS, "created")
        values = (rating.rater, rating.pair, rating.choice,
                  *(rating.scores[f] for f in SCORE_FIELDS), rating.created)
        sql = (f"INSERT INTO ratings ({', '.join(columns)}) "
               f"VALUES ({', '.join('?' * len(columns))})")
        with self._connect() as db:
            try:
                db.execute(sql, values)
            except sqlite3.IntegrityError:
                raise AlreadyRated(f"{rating.rater} has already rated pair {rating.pair}") from None

    def skip(self, rater: str, pair: str) -> None:
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO skips VALUES (?, ?, ?)",
                       (check_rater(rater), pair, datetime.now(UTC).isoformat()))

    def _pairs(self, table: str, rater: str) -> set[str]:
        with self._connect() as db:
            rows = db.execute(f"SELECT pair FROM {table} WHERE rater = ?", (rater,)).fetchall()
        return {r[0] for r in rows}

    def rated(self, rater: str) -> set[str]:
        return self._pairs("ratings", rater)

    def skipped(self, rater: str) -> set[str]:
        return self._pairs("skips", rater)

    def ratings(self) -> list[Rating]:
        """Every rating, oldest first."""
        with self._connect() as db:
            rows = db.execute(f"SELECT rater, pair, choice, {', '.join(SCORE_FIELDS)}, created "
                              "FROM ratings ORDER BY created, rowid").fetchall()
        return [Rating(r[0], r[1], r[2], dict(zip(SCORE_FIELDS, r[3:-1], strict=True)), r[-1])
                for r in rows]
