"""How a worker reads and writes a study's trials in its database: in plain queries, a few per read or write, and,
inside a worker's loop, reads at most once a second.

Optuna's cache in front of a database (``_CachedStorage``) keeps finished trials and reads every unfinished one
again, whole, at each read of the study: a worker read the study 5 times a trial (its count, the queue of waiting
trials, the sampler's three looks, the duplicate check, which now asks the database alone, ``holding``), so with 32
trials running each of 32 workers decoded some 1,800 rows per read, 5 times a trial. Through SQLAlchemy's ORM such
a read took 0.1 s of CPU (an object per row, each parameter's distribution decoded from its JSON), which at 32
workers was the machine's whole CPU. Here:

- ``read_trials``: rows come back as tuples, one query per table, and a distribution's JSON, shared by every trial
  that samples it, is decoded once per process (a third of the ORM's time);
- ``write_rows``: a batch of a trial's parameters and attributes (``autocomp.patient.batched``) in one
  statement per table, its trials' states checked once, where Optuna's ORM looks each trial up again per row;
- ``ThrottledCache``: Optuna's cache, whose reads of the database are skipped while the last one is younger than
  its ``lag`` (0 unless a worker's loop set it, ``lagging``): the reads of one trial's start share one. What it may
  miss for that long is other workers' progress (a count, a generation's size, a recipe being run): as concurrent
  workers may race anyway. A trial's own writes go to the database at once, and once it is told (or popped from
  the queue) the next read is from the database: a worker sees its own trials as they are.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import time
from collections import defaultdict
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy
from optuna import distributions
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects import mysql, postgresql, sqlite

TRIALS = models.TrialModel.__table__
PARAMS = models.TrialParamModel.__table__
VALUES = models.TrialValueModel.__table__
USER_ATTRS = models.TrialUserAttributeModel.__table__
SYSTEM_ATTRS = models.TrialSystemAttributeModel.__table__
INTERMEDIATE = models.TrialIntermediateValueModel.__table__
STUDIES = models.StudyModel.__table__
STUDY_SYSTEM_ATTRS = models.StudySystemAttributeModel.__table__
LAG_SECONDS = 1.0  # how old a worker's view of the other trials may be

if TYPE_CHECKING:
    import optuna


class ThrottledCache(_CachedStorage):
    """Optuna's cache in front of a database, reading the study's new and unfinished trials from it only when its
    last read is ``lag`` seconds old or more (see the module)."""

    def __init__(self, backend) -> None:
        super().__init__(backend)
        self.lag = 0.0
        self._read_at: dict[int, float] = {}  # study id -> time.monotonic() of its last read of trials
        self._system_attrs: dict[int, tuple[float, dict[str, Any]]] = {}  # study id -> (read at, its system attrs)

    def _recent(self, read_at: float | None) -> bool:
        return bool(self.lag) and read_at is not None and time.monotonic() - read_at < self.lag

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        if self._recent(self._read_at.get(study_id)):
            return
        super()._read_trials_from_remote_storage(study_id)
        self._read_at[study_id] = time.monotonic()

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        """Optuna's, after which the next read is from the database: this process sees its own trials as they are
        (a recipe its last trial ran is not run again, a trial it finished counts)."""
        try:
            return super().set_trial_state_values(trial_id, state, values)
        finally:
            self._read_at.clear()

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        """The study's system attributes (NSGA-II's populations, optuna-dashboard's notes: read at every trial,
        and growing with the trials), read again only when the last read is ``lag`` old."""
        read_at, attrs = self._system_attrs.get(study_id, (None, {}))
        if not self._recent(read_at):
            attrs = super().get_study_system_attrs(study_id)
            self._system_attrs[study_id] = time.monotonic(), attrs
        return dict(attrs)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        super().set_study_system_attr(study_id, key, value)
        if study_id in self._system_attrs:  # this process reads what it wrote
            self._system_attrs[study_id][1][key] = value


@contextlib.contextmanager
def lagging(study: optuna.Study, seconds: float = LAG_SECONDS) -> Iterator[None]:
    """A worker's loop, inside which the study's view of the other trials may be ``seconds`` old (a storage
    without ``ThrottledCache`` reads as it always does)."""
    storage = study._storage
    if not isinstance(storage, ThrottledCache):
        yield
        return
    before, storage.lag = storage.lag, seconds
    try:
        yield
    finally:
        storage.lag = before


@functools.lru_cache(maxsize=4096)  # a space's distributions: bounded by its dimensions and their ranges
def distribution(text: str) -> distributions.BaseDistribution:
    return distributions.json_to_distribution(text)


def local_time(utc: datetime.datetime | None) -> datetime.datetime | None:
    """A naive UTC time as stored, in this machine's naive local time (as Optuna's ``TrialModel`` gives it)."""
    return None if utc is None else utc.replace(tzinfo=datetime.timezone.utc).astimezone().replace(tzinfo=None)


def read_trials(connection: sqlalchemy.Connection, study_id: int, states: Container[TrialState] | None,
                included_trial_ids: Iterable[int], trial_id_greater_than: int) -> list[FrozenTrial]:
    """The study's trials in ``states`` (all: None) that are among ``included_trial_ids`` or newer than
    ``trial_id_greater_than`` (all: -1), by trial id: what ``RDBStorage._get_trials`` returns. ``KeyError`` for a
    study that does not exist."""
    included = [i for i in included_trial_ids if i <= trial_id_greater_than]
    where = TRIALS.c.study_id == study_id
    if states is not None:
        where &= TRIALS.c.state.in_(list(states))  # type: ignore[arg-type]
    if trial_id_greater_than > -1:
        newer = TRIALS.c.trial_id > trial_id_greater_than
        where &= sqlalchemy.or_(TRIALS.c.trial_id.in_(included), newer) if included else newer
    rows = connection.execute(sqlalchemy.select(
        TRIALS.c.trial_id, TRIALS.c.number, TRIALS.c.state, TRIALS.c.datetime_start, TRIALS.c.datetime_complete,
    ).where(where).order_by(TRIALS.c.trial_id)).all()
    if not rows:
        check_studies(connection, {study_id})
        return []
    ids = sqlalchemy.select(TRIALS.c.trial_id).where(where).scalar_subquery()

    def of(table: sqlalchemy.Table, *columns: str, order: str) -> dict[int, list[tuple]]:
        """Each trial's rows of ``table`` (``columns``), in ``order``."""
        found: dict[int, list[tuple]] = defaultdict(list)
        query = sqlalchemy.select(table.c.trial_id, *(table.c[c] for c in columns)).where(
            table.c.trial_id.in_(ids)).order_by(table.c[order])
        for trial_id, *rest in connection.execute(query).all():
            found[trial_id].append(tuple(rest))
        return found

    params = of(PARAMS, "param_name", "param_value", "distribution_json", order="param_id")
    values = of(VALUES, "objective", "value", "value_type", order="trial_value_id")
    user = of(USER_ATTRS, "key", "value_json", order="trial_user_attribute_id")
    system = of(SYSTEM_ATTRS, "key", "value_json", order="trial_system_attribute_id")
    steps = of(INTERMEDIATE, "step", "intermediate_value", "intermediate_value_type",
               order="trial_intermediate_value_id")
    return [frozen(row, params[row.trial_id], values[row.trial_id], user[row.trial_id], system[row.trial_id],
                   steps[row.trial_id]) for row in rows]


def holding(connection: sqlalchemy.Connection, study_id: int, states: Iterable[TrialState], key: str, value: Any,
            unless: str) -> list[int]:
    """The numbers of the study's trials in ``states`` whose user attribute ``key`` is ``value`` and that have none
    named ``unless``: one query, where a read of the study would read every unfinished trial whole."""
    attr, other = USER_ATTRS.alias("attr"), USER_ATTRS.alias("other")
    query = (sqlalchemy.select(TRIALS.c.number).join(attr, attr.c.trial_id == TRIALS.c.trial_id)
             .where(TRIALS.c.study_id == study_id, TRIALS.c.state.in_(list(states)), attr.c.key == key,
                    attr.c.value_json == json.dumps(value),
                    ~sqlalchemy.exists().where(other.c.trial_id == TRIALS.c.trial_id, other.c.key == unless))
             .order_by(TRIALS.c.number))
    return list(connection.execute(query).scalars())


def frozen(row, params: list[tuple], values: list[tuple], user: list[tuple], system: list[tuple],
           steps: list[tuple]) -> FrozenTrial:
    """One trial from its rows, as ``RDBStorage._build_frozen_trial_from_trial_model`` builds it."""
    ordered: list[float] | None = None
    if values:
        ordered = [0.0] * len(values)
        for objective, value, kind in values:
            ordered[objective] = models.TrialValueModel.stored_repr_to_value(value, kind)
    kinds = {name: distribution(text) for name, _, text in params}
    return FrozenTrial(
        number=row.number, state=row.state, value=None, values=ordered,
        datetime_start=local_time(row.datetime_start), datetime_complete=local_time(row.datetime_complete),
        params={name: kinds[name].to_external_repr(value) for name, value, _ in params}, distributions=kinds,
        user_attrs={key: json.loads(text) for key, text in user},
        system_attrs={key: json.loads(text) for key, text in system},
        intermediate_values={step: models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(value, kind)
                             for step, value, kind in steps},
        trial_id=row.trial_id,
    )


@dataclass(frozen=True)
class Param:
    """A trial parameter to write: Optuna's ``_set_trial_param`` arguments."""

    trial_id: int
    name: str
    value: float
    distribution: distributions.BaseDistribution
    previous: distributions.BaseDistribution | None  # the study's distribution of that name, where known


@dataclass(frozen=True)
class Attr:
    """An attribute to write: a trial's user or system attribute, or a study's system attribute (where
    optuna-dashboard keeps notes and NSGA-II its populations); ``owner`` is the trial's or the study's id."""

    table: sqlalchemy.Table  # USER_ATTRS, SYSTEM_ATTRS or STUDY_SYSTEM_ATTRS
    owner: int
    key: str
    value: Any


OWNERS = {USER_ATTRS: "trial_id", SYSTEM_ATTRS: "trial_id", STUDY_SYSTEM_ATTRS: "study_id"}  # table -> its owner
UPSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert, "mysql": mysql.insert}


def check_studies(connection: sqlalchemy.Connection, ids: set[int]) -> None:
    """``KeyError`` unless every study of ``ids`` exists."""
    found = set(connection.execute(sqlalchemy.select(STUDIES.c.study_id).where(STUDIES.c.study_id.in_(ids))).scalars())
    if ids - found:
        raise KeyError(f"No study with study_id {min(ids - found)} exists.")


def check_trials(connection: sqlalchemy.Connection, ids: set[int]) -> dict[int, int]:
    """Each trial's study id; ``KeyError`` for a trial that does not exist, ``UpdateFinishedTrialError`` for one that
    finished (as Optuna checks a trial before each write)."""
    found = {row.trial_id: row for row in connection.execute(sqlalchemy.select(
        TRIALS.c.trial_id, TRIALS.c.study_id, TRIALS.c.state).where(TRIALS.c.trial_id.in_(ids)))}
    for trial_id in ids:
        if trial_id not in found:
            raise KeyError(models.NOT_FOUND_MSG)
        if found[trial_id].state.is_finished():
            raise UpdateFinishedTrialError(f"Trial#{trial_id} has already finished and can not be updated.")
    return {trial_id: row.study_id for trial_id, row in found.items()}


def write_rows(connection: sqlalchemy.Connection, writes: list[Param | Attr]) -> None:
    """Write ``writes`` as Optuna's RDBStorage writes them one by one (its studies and trials checked, an
    incompatible distribution refused), in one statement per table; an attribute written twice keeps its last
    value."""
    params = [w for w in writes if isinstance(w, Param)]
    attrs = [w for w in writes if isinstance(w, Attr)]
    studies = {w.owner for w in attrs if OWNERS[w.table] == "study_id"}
    if studies:
        check_studies(connection, studies)
    trials = {w.trial_id for w in params} | {w.owner for w in attrs if OWNERS[w.table] == "trial_id"}
    study_of = check_trials(connection, trials) if trials else {}
    for param in params:
        previous = param.previous or earlier_distribution(connection, study_of[param.trial_id], param.name)
        if previous is not None:
            distributions.check_distribution_compatibility(previous, param.distribution)
    if params:
        connection.execute(sqlalchemy.insert(PARAMS), [
            {"trial_id": p.trial_id, "param_name": p.name, "param_value": p.value,
             "distribution_json": distributions.distribution_to_json(p.distribution)} for p in params])
    for table, owner in OWNERS.items():
        last = {(w.owner, w.key): w.value for w in attrs if w.table is table}
        if last:
            upsert(connection, table, owner, [{owner: who, "key": key, "value_json": json.dumps(value)}
                                              for (who, key), value in last.items()])


def earlier_distribution(connection: sqlalchemy.Connection, study_id: int,
                         name: str) -> distributions.BaseDistribution | None:
    """The distribution of parameter ``name`` in some trial of the study, if any has it."""
    text = connection.execute(sqlalchemy.select(PARAMS.c.distribution_json).join(
        TRIALS, TRIALS.c.trial_id == PARAMS.c.trial_id).where(
        TRIALS.c.study_id == study_id, PARAMS.c.param_name == name).limit(1)).scalar()
    return None if text is None else distribution(text)


def upsert(connection: sqlalchemy.Connection, table: sqlalchemy.Table, owner: str, rows: list[dict]) -> None:
    """Insert ``rows`` of an attribute table, replacing the value of an (``owner``, key) that has one (the databases
    ``autocomp.storage`` opens: SQLite, PostgreSQL, MySQL)."""
    dialect = connection.engine.name
    insert = UPSERTS[dialect](table).values(rows)
    if dialect == "mysql":
        connection.execute(insert.on_duplicate_key_update(value_json=insert.inserted.value_json))
    else:
        connection.execute(insert.on_conflict_do_update(index_elements=[table.c[owner], table.c.key],
                                                        set_={"value_json": insert.excluded.value_json}))
