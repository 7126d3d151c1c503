//! The typing stubs' model blocks, generated from the schema description. The test below
//! fails when `python/cmbagent_db/_native.pyi` differs from what the description gives;
//! `CMBAGENT_DB_WRITE_STUBS=1 cargo test stubs` rewrites the blocks in place.

use crate::schema::{ColType, ColumnDefault, RelKind, Table, TableId, TABLES};

const BEGIN: &str = "    # generated from the schema description: begin\n";
const END: &str = "    # generated from the schema description: end\n";

fn python_type(c: &crate::schema::Column) -> String {
    let base = match c.ty {
        ColType::Str(_) | ColType::Text => "str",
        ColType::Integer | ColType::BigInt => "int",
        ColType::Boolean => "bool",
        ColType::Timestamp { .. } => "datetime",
        ColType::Json => return "Any".into(),
    };
    // Insert-time defaults are None until the row is written.
    if c.nullable || c.default == ColumnDefault::Now {
        format!("{base} | None")
    } else {
        base.into()
    }
}

/// The generated part of one model class's stub.
pub fn model_block(t: &Table) -> String {
    let mut out = String::from(BEGIN);
    out.push_str("    __tablename__: str\n");
    for c in t.columns {
        out.push_str(&format!("    {}: Column[{}]\n", c.name, python_type(c)));
    }
    for r in t.relationships {
        let target = TABLES[r.target()].model;
        let ty = match r.kind {
            RelKind::ToParent => format!("{target} | None"),
            RelKind::ToChildren => format!("RelationshipList[{target}]"),
        };
        out.push_str(&format!("    {}: Relationship[{ty}]\n", r.name));
    }
    let mut args: Vec<String> = t
        .columns
        .iter()
        .map(|c| format!("{}: {} = ...", c.name, python_type(c)))
        .collect();
    args.extend(
        t.relationships
            .iter()
            .filter(|r| r.kind == RelKind::ToParent)
            .map(|r| format!("{}: {} | None = ...", r.name, TABLES[r.target()].model)),
    );
    out.push_str(&format!(
        "    def __new__(cls, *, {}) -> Self: ...\n",
        args.join(", ")
    ));
    out.push_str(END);
    out
}

/// `stub` with every model class's block replaced by the generated one.
pub fn regenerate(stub: &str) -> Result<String, String> {
    let mut out = stub.to_string();
    for (_, t) in TableId::all() {
        let class = format!("class {}(Model):\n", t.model);
        let at = out
            .find(&class)
            .ok_or_else(|| format!("the stub has no {class:?}"))?;
        let begin = at
            + out[at..]
                .find(BEGIN)
                .ok_or_else(|| format!("{} has no generated block", t.model))?;
        let end = begin
            + out[begin..]
                .find(END)
                .ok_or_else(|| format!("{}'s generated block has no end", t.model))?
            + END.len();
        out.replace_range(begin..end, &model_block(t));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_model_blocks_match_the_schema() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/cmbagent_db/_native.pyi"
        );
        let stub = std::fs::read_to_string(path).unwrap();
        let want = regenerate(&stub).unwrap();
        if std::env::var_os("CMBAGENT_DB_WRITE_STUBS").is_some() {
            std::fs::write(path, &want).unwrap();
            return;
        }
        assert!(
            stub == want,
            "the model blocks of {path} differ from the schema; run CMBAGENT_DB_WRITE_STUBS=1 cargo test stubs"
        );
    }

    #[test]
    fn nullable_and_insert_time_columns_are_optional() {
        let block = model_block(&TABLES[crate::schema::APPROVAL_REQUESTS]);
        assert!(block.contains("    expires_at: Column[datetime]\n"));
        assert!(block.contains("    created_at: Column[datetime | None]\n"));
        assert!(block.contains("    run: Relationship[WorkflowRun | None]\n"));
        let runs = model_block(&TABLES[crate::schema::WORKFLOW_RUNS]);
        assert!(runs.contains("approval_requests: Relationship[RelationshipList[ApprovalRequest]]"));
    }
}
