//! `Query`: what `db.query(...)` returns. Each builder method returns a new query; the
//! terminal methods run it through the session.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::error::ErrorKind;
use crate::expr::{ColRef, Expr};
use crate::python::convert::{to_value, Purpose};
use crate::python::errors::raise;
use crate::python::expression::{criterion, PyColumn, PyOrdering};
use crate::python::model::table_of_class;
use crate::python::relationship::{preload, PyLoadOption};
use crate::python::session::{column_of, PyDbSession};
use crate::query::Select;
use crate::schema::{TableId, TABLES};

#[pyclass(module = "cmbagent_db", name = "Query")]
pub struct PyQuery {
    session: Py<PyDbSession>,
    select: Select,
    /// Whether rows become model objects (`query(Model)`) or tuples (`query(Model.col)`).
    entity: bool,
    /// Whether rows overwrite objects the session already tracks (`populate_existing()`).
    overwrite: bool,
    /// Relationships loaded for every object returned: (table, relationship index).
    eager: Vec<(TableId, usize)>,
}

impl PyQuery {
    pub fn new(session: Py<PyDbSession>, entities: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        let first = entities.get_item(0).map_err(|_| {
            PyTypeError::new_err("query() needs a model class or one or more columns")
        })?;
        if let Some(table) = table_of_class(&first) {
            if entities.len() > 1 {
                return Err(raise(
                    ErrorKind::InvalidRequest,
                    "query() takes one model class (joins are not supported)",
                ));
            }
            return Ok(PyQuery {
                session,
                select: Select::all_columns(table),
                entity: true,
                overwrite: false,
                eager: Vec::new(),
            });
        }
        let mut columns = Vec::new();
        let mut table = None;
        for e in entities.iter() {
            let c = e.cast::<PyColumn>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "query() takes a model class or its columns, got {}",
                    e.repr().map(|r| r.to_string()).unwrap_or_default()
                ))
            })?;
            let col = c.get().col;
            if *table.get_or_insert(col.table) != col.table {
                return Err(raise(
                    ErrorKind::InvalidRequest,
                    "query() columns must all come from one model (joins are not supported)",
                ));
            }
            columns.push(col.column);
        }
        let mut select = Select::all_columns(table.unwrap_or_default());
        select.columns = columns;
        Ok(PyQuery {
            session,
            select,
            entity: false,
            overwrite: false,
            eager: Vec::new(),
        })
    }

    fn with(&self, py: Python<'_>, select: Select) -> PyQuery {
        PyQuery {
            session: self.session.clone_ref(py),
            select,
            entity: self.entity,
            overwrite: self.overwrite,
            eager: self.eager.clone(),
        }
    }

    fn check_table(&self, e: &Expr) -> PyResult<()> {
        let mut wrong = None;
        e.for_each_column(&mut |c: ColRef| {
            if c.table != self.select.table {
                wrong = Some(c);
            }
        });
        match wrong {
            Some(c) => Err(raise(
                ErrorKind::InvalidRequest,
                format!(
                    "a query of {} cannot filter on {} (joins are not supported)",
                    TABLES[self.select.table].model,
                    c.qualified()
                ),
            )),
            None => Ok(()),
        }
    }

    fn run(&self, py: Python<'_>, select: &Select) -> PyResult<Vec<Py<PyAny>>> {
        let session = self.session.bind(py);
        let objs = session
            .borrow_mut()
            .fetch(py, select, self.entity, self.overwrite)?;
        for &(table, index) in &self.eager {
            preload(py, session, &objs, table, index, self.overwrite)?;
        }
        Ok(objs)
    }

    fn limited(&self, n: u64) -> Select {
        let mut s = self.select.clone();
        s.limit = Some(s.limit.map_or(n, |l| l.min(n)));
        s
    }
}

fn non_negative(v: Option<i64>, what: &str) -> PyResult<Option<u64>> {
    match v {
        None => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n as u64)),
        Some(n) => Err(PyValueError::new_err(format!(
            "{what}() takes a non-negative number, got {n}"
        ))),
    }
}

#[pymethods]
impl PyQuery {
    /// Adds criteria, all of which must hold.
    #[pyo3(signature = (*criteria))]
    fn filter(&self, py: Python<'_>, criteria: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        for c in criteria.iter() {
            let e = criterion(&c, "filter()")?;
            self.check_table(&e)?;
            select.filters.push(e);
        }
        Ok(self.with(py, select))
    }

    /// Adds `column == value` criteria by column name.
    #[pyo3(signature = (**kwargs))]
    fn filter_by(&self, py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        let table = select.table;
        for (k, v) in kwargs.into_iter().flat_map(|d| d.iter()) {
            let name = k.cast::<PyString>()?.to_str()?.to_owned();
            let col = ColRef {
                table,
                column: column_of(table, &name)?,
            };
            select.filters.push(if v.is_none() {
                Expr::IsNull(col, false)
            } else {
                Expr::Compare(
                    col,
                    crate::expr::CmpOp::Eq,
                    to_value(col, &v, Purpose::Compare)?,
                )
            });
        }
        Ok(self.with(py, select))
    }

    /// Sorts by columns (`Model.col`, `Model.col.desc()` or a column name); `None` clears.
    #[pyo3(signature = (*clauses))]
    fn order_by(&self, py: Python<'_>, clauses: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        let table = select.table;
        for c in clauses.iter() {
            if c.is_none() {
                select.order_by.clear();
                continue;
            }
            let (col, desc) = if let Ok(o) = c.cast::<PyOrdering>() {
                (o.get().col, o.get().descending)
            } else if let Ok(col) = c.cast::<PyColumn>() {
                (col.get().col, false)
            } else if let Ok(name) = c.cast::<PyString>() {
                (
                    ColRef {
                        table,
                        column: column_of(table, name.to_str()?)?,
                    },
                    false,
                )
            } else {
                return Err(PyTypeError::new_err(format!(
                    "order_by() takes columns such as ApprovalRequest.created_at.desc(), got {}",
                    c.repr()?
                )));
            };
            if col.table != table {
                return Err(raise(
                    ErrorKind::InvalidRequest,
                    format!(
                        "cannot order a query of {} by {}",
                        TABLES[table].model,
                        col.qualified()
                    ),
                ));
            }
            select.order_by.push((col.column, desc));
        }
        Ok(self.with(py, select))
    }

    #[pyo3(signature = (limit))]
    fn limit(&self, py: Python<'_>, limit: Option<i64>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        select.limit = non_negative(limit, "limit")?;
        Ok(self.with(py, select))
    }

    #[pyo3(signature = (offset))]
    fn offset(&self, py: Python<'_>, offset: Option<i64>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        select.offset = non_negative(offset, "offset")?;
        Ok(self.with(py, select))
    }

    /// Rows read by this query overwrite the objects the session already tracks (those
    /// without unsaved changes), instead of the identity map returning them as they were.
    fn populate_existing(&self, py: Python<'_>) -> PyQuery {
        let mut q = self.with(py, self.select.clone());
        q.overwrite = true;
        q
    }

    /// Loader options: `selectinload(WorkflowRun.approval_requests)`, ...
    #[pyo3(signature = (*options))]
    fn options(&self, py: Python<'_>, options: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        let mut q = self.with(py, self.select.clone());
        for o in options.iter() {
            let o = o.cast::<PyLoadOption>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "options() takes selectinload(...) / joinedload(...), got {}",
                    o.repr().map(|r| r.to_string()).unwrap_or_default()
                ))
            })?;
            let (table, index) = (o.get().table, o.get().index);
            if !self.entity || table != self.select.table {
                return Err(raise(
                    ErrorKind::InvalidRequest,
                    format!(
                        "{}.{} is not a relationship of what this query returns",
                        TABLES[table].model, TABLES[table].relationships[index].name
                    ),
                ));
            }
            q.eager.push((table, index));
        }
        Ok(q)
    }

    fn all<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.run(py, &self.select)?)
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.all(py)?.try_iter()?.into_any())
    }

    /// The first row, or None.
    fn first(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self.run(py, &self.limited(1))?.into_iter().next())
    }

    /// Exactly one row, else NoResultFound / MultipleResultsFound.
    fn one(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.one_or_none(py)?.ok_or_else(|| {
            raise(
                ErrorKind::NoResultFound,
                format!(
                    "no {} row matched the query",
                    TABLES[self.select.table].name
                ),
            )
        })
    }

    /// One row or None; MultipleResultsFound for more.
    fn one_or_none(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let mut rows = self.run(py, &self.limited(2))?;
        if rows.len() > 1 {
            return Err(raise(
                ErrorKind::MultipleResultsFound,
                format!(
                    "several {} rows matched a query that expected one",
                    TABLES[self.select.table].name
                ),
            ));
        }
        Ok(rows.pop())
    }

    /// The first column of the first row, or None.
    fn scalar(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.first(py)? {
            Some(row) if !self.entity => Ok(Some(row.bind(py).get_item(0)?.unbind())),
            other => Ok(other),
        }
    }

    fn count(&self, py: Python<'_>) -> PyResult<i64> {
        self.session.bind(py).borrow_mut().count(py, &self.select)
    }

    /// The object with this primary key, or None (legacy `query(M).get(pk)`).
    fn get(&self, py: Python<'_>, ident: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        self.session
            .bind(py)
            .borrow_mut()
            .get_by_pk(py, self.select.table, ident)
    }

    /// Sets columns on every matching row in one UPDATE; returns the number matched.
    /// Runs in the session's transaction: commit() makes it permanent.
    #[pyo3(signature = (values, synchronize_session = None))]
    fn update(
        &self,
        py: Python<'_>,
        values: &Bound<'_, PyDict>,
        synchronize_session: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let _ = synchronize_session;
        self.guard_bulk("update")?;
        self.session.bind(py).borrow_mut().bulk_update(
            py,
            self.select.table,
            &self.select.filters,
            values,
        )
    }

    /// Deletes every matching row in one DELETE; returns the number deleted.
    /// Runs in the session's transaction: commit() makes it permanent.
    #[pyo3(signature = (synchronize_session = None))]
    fn delete(
        &self,
        py: Python<'_>,
        synchronize_session: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let _ = synchronize_session;
        self.guard_bulk("delete")?;
        self.session
            .bind(py)
            .borrow_mut()
            .bulk_delete(py, self.select.table, &self.select.filters)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let d = self.session.bind(py).borrow().dialect();
        format!("<Query {}>", self.select.render(d).0)
    }
}

impl PyQuery {
    fn guard_bulk(&self, what: &str) -> PyResult<()> {
        if self.select.limit.is_some()
            || self.select.offset.is_some()
            || !self.select.order_by.is_empty()
        {
            return Err(raise(
                ErrorKind::InvalidRequest,
                format!("{what}() cannot follow limit(), offset() or order_by(); filter the rows instead"),
            ));
        }
        Ok(())
    }
}
