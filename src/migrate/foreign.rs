//! cmbagent's own Alembic chain, as facts: its revision ids, oldest first, and what each
//! adds to the five tables. A database that chain migrated keeps its id in `alembic_version`;
//! this package then keeps its own record apart and must not add, ahead of that chain, a
//! column or table one of its later revisions adds (that revision would then fail).

/// `(revision, objects it adds)`: `table` or `table.column`.
const CHAIN: &[(&str, &[&str])] = &[
    (
        "92e46cb423de",
        &["sessions", "workflow_runs", "approval_requests"],
    ),
    ("fca0d6632d2f", &[]),
    (
        "490016e6a277",
        &[
            "workflow_runs.branch_parent_id",
            "workflow_runs.is_branch",
            "workflow_runs.branch_depth",
        ],
    ),
    ("f524830711dc", &[]),
    ("a1b2c3d4e5f6", &[]),
    ("b2c3d4e5f6a7", &[]),
    ("c3d4e5f6a7b8", &[]),
    ("d4e5f6a7b8c9", &["session_states"]),
    (
        "e5f6a7b8c9d0",
        &[
            "approval_requests.session_id",
            "approval_requests.approval_type",
            "approval_requests.context",
            "approval_requests.result",
            "approval_requests.created_at",
            "approval_requests.expires_at",
            "active_connections",
        ],
    ),
    ("f6a7b8c9d0e1", &[]),
    ("a7b8c9d0e1f2", &[]),
    (
        "b8c9d0e1f2a3",
        &[
            "workflow_runs.parent_run_id",
            "workflow_runs.stage_number",
            "workflow_runs.stage_name",
        ],
    ),
];

/// For a database at cmbagent's revision `at`: the `(later revision, object)` pairs whose
/// object is not there yet (`exists(table, column)` says what is).
pub fn pending_additions(
    at: &str,
    exists: impl Fn(&str, Option<&str>) -> bool,
) -> Vec<(&'static str, &'static str)> {
    let Some(i) = CHAIN.iter().position(|(r, _)| *r == at) else {
        return Vec::new();
    };
    CHAIN[i + 1..]
        .iter()
        .flat_map(|(r, objects)| objects.iter().map(move |o| (*r, *o)))
        .filter(|(_, o)| {
            let (table, column) = match o.split_once('.') {
                Some((t, c)) => (t, Some(c)),
                None => (*o, None),
            };
            !exists(table, column)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_of_cmbagent_chain_has_nothing_pending() {
        assert!(pending_additions("b8c9d0e1f2a3", |_, _| false).is_empty());
        assert!(pending_additions("not-cmbagent", |_, _| false).is_empty());
    }

    #[test]
    fn an_older_revision_lists_what_later_ones_add_and_is_missing() {
        let missing = pending_additions("e5f6a7b8c9d0", |t, c| {
            !(t == "workflow_runs" && c == Some("stage_name"))
        });
        assert_eq!(missing, vec![("b8c9d0e1f2a3", "workflow_runs.stage_name")]);
        let all = pending_additions("d4e5f6a7b8c9", |_, _| false);
        assert!(all.contains(&("e5f6a7b8c9d0", "active_connections")));
    }

    #[test]
    fn every_object_names_one_of_the_five_tables_and_its_columns() {
        use crate::schema::{table_by_name, TABLES};
        for (_, objects) in CHAIN {
            for o in *objects {
                let (t, c) = o.split_once('.').unwrap_or((o, ""));
                let t = table_by_name(t).unwrap_or_else(|| panic!("{o}"));
                assert!(c.is_empty() || TABLES[t].column_index(c).is_some(), "{o}");
            }
        }
    }
}
