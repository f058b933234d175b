//! Embedded schema migrations (`migrations/*.sql` at the repository root).
//!
//! Each file is applied once, in name order, inside its own transaction, and
//! recorded in `ibex_core.schema_migrations`. An advisory lock serialises
//! concurrent runs. Applied files are never re-run or edited in place: a schema
//! change is a new numbered file added to [`MIGRATIONS`].

use tokio_postgres::Client;

use crate::{DbFailure, Result};

/// One embedded migration.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// File name, also the key recorded as applied.
    pub name: &'static str,
    /// The SQL script.
    pub sql: &'static str,
}

/// All migrations, sorted by name. A unit test checks this list against the
/// directory so a new file cannot be forgotten here.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001_core_schema.sql",
        sql: include_str!("../../migrations/0001_core_schema.sql"),
    },
    Migration {
        name: "0002_agent_api_keys.sql",
        sql: include_str!("../../migrations/0002_agent_api_keys.sql"),
    },
];

/// Arbitrary constant identifying the migration advisory lock.
const LOCK_KEY: i64 = 0x1be7_d1ec_7001;

const BOOTSTRAP: &str = "
    CREATE SCHEMA IF NOT EXISTS ibex_core;
    CREATE TABLE IF NOT EXISTS ibex_core.schema_migrations (
        name       text        PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    );";

/// Applies every migration not yet recorded; returns the names applied now.
pub async fn run(client: &mut Client) -> Result<Vec<&'static str>> {
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let tx = client.transaction().await.map_err(DbFailure::from)?;
        // Transaction-scoped, so a crash cannot leave it held.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(DbFailure::from)?;
        tx.batch_execute(BOOTSTRAP).await.map_err(DbFailure::from)?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM ibex_core.schema_migrations WHERE name = $1",
                &[&m.name],
            )
            .await
            .map_err(DbFailure::from)?
            .is_some();
        if done {
            tx.rollback().await.map_err(DbFailure::from)?;
            continue;
        }
        tx.batch_execute(m.sql).await.map_err(|e| {
            let f = DbFailure::from(e);
            tracing::error!(migration = m.name, error = %f, "migration failed");
            f
        })?;
        tx.execute(
            "INSERT INTO ibex_core.schema_migrations (name) VALUES ($1)",
            &[&m.name],
        )
        .await
        .map_err(DbFailure::from)?;
        tx.commit().await.map_err(DbFailure::from)?;
        tracing::info!(migration = m.name, "migration applied");
        applied.push(m.name);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_list_matches_directory_and_is_sorted() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(on_disk, embedded);
        let mut sorted = embedded.clone();
        sorted.sort();
        assert_eq!(sorted, embedded);
    }
}
