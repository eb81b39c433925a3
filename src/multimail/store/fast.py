"""Hot statements compiled once and run straight on the driver's cursor.

``conn.execute(statement, params)`` costs 20-70 us of Python per statement before the
driver sees it (cache-key lookup, an execution context, parameter processing, a result
object), against ~5 us for the driver itself. On the send path (nine statements) and the
delivery worker's recording, that was about a third of the server's CPU (py-spy). A
:class:`Compiled` statement does the same work once per dialect — SQLAlchemy's compiler
writes the SQL and chooses each parameter's and result column's type processor — and each
execution then only converts the values and calls the cursor.

What stays the same as ``conn.execute``:
- the SQL text, the parameter conversions (JSON, timestamps, booleans, PostgreSQL casts)
  and the result conversions: they are SQLAlchemy's own, taken from the compiled form;
- the transaction: the statement runs on the connection's DBAPI connection, inside
  whatever transaction or savepoint ``conn`` has open;
- errors: a driver error goes through SQLAlchemy's handler, so callers catch the same
  ``sqlalchemy.exc.IntegrityError`` etc. and a dropped connection is invalidated;
- ``before_cursor_execute``/``after_cursor_execute`` listeners are called (with no
  execution context), so statement counters in tests and benchmarks still count.

Only statements that need nothing at execution time qualify: no Python-side column
defaults, no callables as values, no literal parameters a caller gives. Compiling one that
does raises at once, so a statement that does not fit fails its first test, never silently.
An expanding ``IN`` list is planned once per list length (SQLAlchemy renders it).
Rows come back as plain dicts keyed like ``RowMapping``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Insert, Update
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

_Processor = Callable[[Any], Any] | None
_MISSING = object()


@dataclass(frozen=True)
class _Param:
    key: str  # the name callers pass it under
    processor: _Processor
    default: Any  # the value written into the statement, or _MISSING when required
    index: int = -1  # >= 0: this element of the list given under ``key`` (an expanding IN)


@dataclass
class _Plan:
    sql: str
    positional: bool
    names: tuple[str, ...]  # the driver's parameter names (pyformat dialects)
    params: tuple[_Param, ...]
    columns: tuple[str, ...]  # result keys; empty for statements returning nothing
    column_types: tuple[Any, ...]
    expands: bool = False  # has expanding IN lists (one execution at a time)
    # Result processors depend on the driver's type codes, known after the first execution.
    result_processors: tuple[_Processor, ...] | None = None


@dataclass(frozen=True, eq=False)
class _Form:
    """A statement compiled for one driver (and key set), before expanding lists."""

    compiled: SQLCompiler
    what: str  # the start of its SQL, for errors
    expanding: tuple[str, ...]  # the keys of its expanding IN lists, in a fixed order


def _compile(statement: ClauseElement, dialect: Dialect, keys: tuple[str, ...] | None) -> _Form:
    if isinstance(statement, Insert) and not statement._returning:
        # Nobody asks for the new primary key: without this PostgreSQL would return it.
        statement = statement.inline()
    compiled = statement.compile(dialect=dialect, column_keys=list(keys) if keys else None)
    assert isinstance(compiled, SQLCompiler)
    what = " ".join(compiled.string.split())[:80]
    if compiled.insert_prefetch or compiled.update_prefetch:
        raise TypeError(f"{what}: Python-side column defaults need conn.execute")
    for bind in compiled.literal_execute_params:
        # Constants SQLAlchemy writes into the SQL at execution (aggregate_strings'
        # separator) are written in once per plan; one a caller gives cannot be.
        if bind.expanding or bind.required or not bind.key.startswith("%("):
            raise TypeError(f"{what}: a literal parameter ({bind.key}) needs conn.execute")
    for bind in compiled.post_compile_params:
        if not bind.expanding or compiled.escaped_bind_names:
            raise TypeError(f"{what}: parameter {bind.key} needs conn.execute")
    expanding = tuple(sorted(bind.key for bind in compiled.post_compile_params))
    return _Form(compiled, what, expanding)


def _plan(form: _Form, lengths: tuple[int, ...]) -> _Plan:
    """The plan for lists of these lengths (one per ``form.expanding`` key)."""
    compiled, what = form.compiled, form.what
    by_name = {name: bind for bind, name in compiled.bind_names.items()}
    processors = dict(compiled._bind_processors)
    sql = compiled.string
    # An expanded name (ids_2) is that element of its list (ids).
    element: dict[str, tuple[str, int]] = {}
    if compiled.literal_execute_params or compiled.post_compile_params:
        length_of = dict(zip(form.expanding, lengths, strict=True))
        values = {
            name: [None] * length_of[bind.key] if bind.expanding else bind.value
            for name, bind in by_name.items()
        }
        # SQLAlchemy's own rendering of the lists and literals; the values of the list
        # elements do not change the SQL, only their number does.
        expanded = compiled._process_parameters_for_postcompile(values)
        sql = expanded.statement
        processors.update(expanded.processors)
        for name, parts in expanded.parameter_expansion.items():
            element.update((part, (name, i)) for i, part in enumerate(parts))
        if compiled.positional:
            assert expanded.positiontup is not None
            order = list(expanded.positiontup)
        else:
            order = list(expanded.parameters)
    elif compiled.positional:
        assert compiled.positiontup is not None
        order = list(compiled.positiontup)
    else:
        order = list(compiled.bind_names.values())
    params = []
    for name in order:
        source, index = element.get(name, (name, -1))
        bind = by_name[source]
        if bind.callable is not None:
            raise TypeError(f"{what}: a callable parameter ({name}) needs conn.execute")
        default = _MISSING if bind.required else bind.value
        processor = processors.get(name)
        params.append(_Param(bind.key, processor, default, index))  # type: ignore[arg-type]
    escaped = compiled.escaped_bind_names
    names = tuple(escaped.get(name, name) for name in order)
    entries = compiled._result_columns
    columns = tuple(entry.keyname for entry in entries)
    if len(set(columns)) != len(columns):
        raise TypeError(f"{what}: result columns share a name; label them")
    return _Plan(
        sql=sql,
        positional=compiled.positional,
        names=names,
        params=tuple(params),
        columns=columns,
        column_types=tuple(entry.type for entry in entries),
        expands=bool(form.expanding),
    )


class Compiled:
    """One statement, compiled per dialect (and, for an INSERT given its values as
    parameters, per set of column names) on first use."""

    def __init__(self, statement: ClauseElement, *, keys: Sequence[str] | None = None) -> None:
        """``keys``: for an INSERT or UPDATE, the parameter names every execution gives.
        Without it each execution's own keys decide, as with ``conn.execute``: a key naming
        a column of the table adds that column to the VALUES or the SET clause."""
        self._statement = statement
        self._keys = tuple(keys) if keys is not None else None
        # An INSERT or UPDATE compiles its VALUES/SET from the keys it is given.
        self._keyed = isinstance(statement, (Insert, Update))
        self._forms: dict[tuple[str, str, tuple[str, ...] | None], _Form] = {}
        self._plans: dict[tuple[_Form, tuple[int, ...]], _Plan] = {}

    def _plan_for(self, conn: Connection, first: Mapping[str, Any]) -> _Plan:
        keys = self._keys
        if keys is None and self._keyed:
            keys = tuple(first)
        dialect = conn.dialect
        # By driver too: the parameter style and type processors are the driver's.
        slot = (dialect.name, dialect.driver, keys)
        form = self._forms.get(slot)
        if form is None:
            form = self._forms[slot] = _compile(self._statement, dialect, keys)
        lengths = tuple(len(first[key]) for key in form.expanding) if form.expanding else ()
        plan = self._plans.get((form, lengths))
        if plan is None:
            plan = self._plans[(form, lengths)] = _plan(form, lengths)
        return plan

    @staticmethod
    def _values(plan: _Plan, params: Mapping[str, Any]) -> Any:
        values = []
        for param in plan.params:
            value = params.get(param.key, param.default)
            if value is _MISSING:
                raise KeyError(f"the statement needs a value for {param.key!r}")
            if param.index >= 0:
                value = value[param.index]
            values.append(value if param.processor is None else param.processor(value))
        if plan.positional:
            return tuple(values)
        return dict(zip(plan.names, values, strict=True))

    def _run(
        self, conn: Connection, plan: _Plan, parameters: Any, many: bool
    ) -> tuple[int, Sequence[Any]]:
        if "schema_translate_map" in conn._execution_options:
            raise TypeError("schema translation needs conn.execute")
        if not conn.in_transaction():
            conn._autobegin()  # as conn.execute would: never autocommit by accident
        elif (conn._transaction is not None and not conn._transaction.is_active) or (
            conn._nested_transaction is not None and not conn._nested_transaction.is_active
        ):
            conn._invalid_transaction()  # raises PendingRollbackError, as conn.execute does
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        sql = plan.sql
        cursor = dbapi.cursor()
        try:
            if conn.dispatch.before_cursor_execute:
                # One by one, as conn.execute does: a retval=True listener may rewrite them
                # (SQLAlchemy wraps the others to hand back what they were given).
                for listener in conn.dispatch.before_cursor_execute:
                    sql, parameters = listener(conn, cursor, sql, parameters, None, many)
            if conn._echo:
                conn._log_info(sql)
                if not conn.engine.hide_parameters:
                    conn._log_info("[store.fast] %r", parameters)
            if many:
                cursor.executemany(sql, parameters)
            else:
                cursor.execute(sql, parameters)
            rows = cursor.fetchall() if plan.columns else []
            if plan.columns and plan.result_processors is None:
                plan.result_processors = self._result_processors(conn, plan, cursor)
            if conn.dispatch.after_cursor_execute:
                conn.dispatch.after_cursor_execute(conn, cursor, sql, parameters, None, many)
            return cursor.rowcount, rows
        except BaseException as exc:
            # As conn.execute: driver errors become SQLAlchemy's (a dropped connection is
            # invalidated), an interrupt invalidates too; anything else passes unchanged.
            if isinstance(exc, conn.dialect.loaded_dbapi.Error) or not isinstance(exc, Exception):
                conn._handle_dbapi_exception(exc, sql, parameters, cursor, None)
            raise
        finally:
            cursor.close()

    @staticmethod
    def _result_processors(conn: Connection, plan: _Plan, cursor: Any) -> tuple[_Processor, ...]:
        description = cursor.description or []
        codes = [column[1] for column in description]
        if len(codes) != len(plan.columns):
            codes = [None] * len(plan.columns)
        return tuple(
            type_._cached_result_processor(conn.dialect, code)
            for type_, code in zip(plan.column_types, codes, strict=True)
        )

    def execute(self, conn: Connection, params: Mapping[str, Any] | None = None) -> int:
        """Run it once; the driver's row count."""
        given = params or {}
        plan = self._plan_for(conn, given)
        rowcount, _ = self._run(conn, plan, self._values(plan, given), many=False)
        return int(rowcount)

    def executemany(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run it once per parameter set, in one driver call."""
        if not rows:
            return
        plan = self._plan_for(conn, rows[0])
        if plan.expands:
            raise TypeError("expanding IN lists cannot be used with executemany")
        self._run(conn, plan, [self._values(plan, row) for row in rows], many=True)

    def all(
        self, conn: Connection, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """A SELECT's (or RETURNING's) rows, as dicts keyed like ``RowMapping``."""
        given = params or {}
        plan = self._plan_for(conn, given)
        if not plan.columns:
            raise TypeError("the statement returns no rows")
        _, rows = self._run(conn, plan, self._values(plan, given), many=False)
        processors = plan.result_processors
        assert processors is not None
        columns = plan.columns
        out = []
        for raw in rows:
            out.append(
                {
                    key: (value if process is None else process(value))
                    for key, process, value in zip(columns, processors, raw, strict=True)
                }
            )
        return out

    def first(
        self, conn: Connection, params: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The first row, or None."""
        rows = self.all(conn, params)
        return rows[0] if rows else None

    def scalar(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row, or None."""
        row = self.first(conn, params)
        return None if row is None else next(iter(row.values()))
