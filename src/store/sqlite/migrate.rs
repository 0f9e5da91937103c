//! SQLite migrations, run with rusqlite. They keep sqlx's bookkeeping (`_sqlx_migrations`, a SHA-384
//! checksum of each file), so a database migrated by an earlier jobhook, which ran them with sqlx, is
//! recognised as it is.

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha384};

use super::*;

/// The migrations, in order: (version, description, SQL).
const MIGRATIONS: [(i64, &str, &str); 11] = [
    (1, "init", include_str!("../migrations/sqlite/0001_init.sql")),
    (2, "lighter job index", include_str!("../migrations/sqlite/0002_lighter_job_index.sql")),
    (3, "key revoked by", include_str!("../migrations/sqlite/0003_key_revoked_by.sql")),
    (4, "delivery claims", include_str!("../migrations/sqlite/0004_delivery_claims.sql")),
    (5, "retention", include_str!("../migrations/sqlite/0005_retention.sql")),
    (6, "live dedupe", include_str!("../migrations/sqlite/0006_live_dedupe.sql")),
    (7, "response capture", include_str!("../migrations/sqlite/0007_response_capture.sql")),
    (8, "callback headers", include_str!("../migrations/sqlite/0008_callback_headers.sql")),
    (9, "payload metadata", include_str!("../migrations/sqlite/0009_payload_metadata.sql")),
    (10, "idempotency keys", include_str!("../migrations/sqlite/0010_idempotency_keys.sql")),
    (11, "subscriptions by job in time", include_str!("../migrations/sqlite/0011_subscriptions_by_job_in_time.sql")),
];

/// The migration a database says it has applied, changed since.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {0} was applied but has been changed since")]
    Changed(i64),
    #[error("migration {0} failed partway through earlier; the database needs a look by hand")]
    Dirty(i64),
    #[error("migration {0} would leave rows of table {1} referring to rows that do not exist")]
    ForeignKeys(i64, String),
}

/// Applies the migrations this database lacks, each in a transaction of its own. Migrations keep every
/// table and column an older jobhook reads and writes (they add columns, tables and indexes; 0011
/// rebuilt a table with the same columns and one constraint fewer), so versions applied by a newer
/// jobhook and unknown here are left alone: an older binary that restarts must not refuse to start.
///
/// They run with foreign keys off, as SQLite asks of a migration that rebuilds a table (0011), and each
/// checks them (`PRAGMA foreign_key_check`) before it commits.
pub(super) fn run(conn: &mut Connection) -> Result<()> {
    let failed = |e: rusqlite::Error| StoreError::Migrate(Arc::new(e));
    conn.pragma_update(None, "foreign_keys", "OFF").map_err(failed)?;
    let migrated = apply(conn);
    conn.pragma_update(None, "foreign_keys", "ON").map_err(failed)?;
    migrated
}

fn apply(conn: &mut Connection) -> Result<()> {
    let failed = |e: rusqlite::Error| StoreError::Migrate(Arc::new(e));
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
            version BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
            success BOOLEAN NOT NULL,
            checksum BLOB NOT NULL,
            execution_time BIGINT NOT NULL
        )",
    )
    .map_err(failed)?;
    let applied: Vec<(i64, bool, Vec<u8>)> = conn
        .prepare("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
        .map_err(failed)?;
    for (version, success, _) in &applied {
        if !success {
            return Err(StoreError::Migrate(Arc::new(MigrateError::Dirty(*version))));
        }
    }
    for (version, description, sql) in MIGRATIONS {
        let checksum = Sha384::digest(sql.as_bytes()).to_vec();
        if let Some((_, _, stored)) = applied.iter().find(|(v, _, _)| *v == version) {
            if *stored != checksum {
                return Err(StoreError::Migrate(Arc::new(MigrateError::Changed(version))));
            }
            continue;
        }
        let started = std::time::Instant::now();
        let tx = conn.transaction().map_err(failed)?;
        tx.execute_batch(sql).map_err(failed)?;
        let broken: Option<String> =
            tx.query_row("PRAGMA foreign_key_check", [], |r| r.get(0)).optional().map_err(failed)?;
        if let Some(table) = broken {
            return Err(StoreError::Migrate(Arc::new(MigrateError::ForeignKeys(version, table))));
        }
        let nanos = i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (?1, ?2, TRUE, ?3, ?4)",
            params![version, description, checksum, nanos],
        )
        .map_err(failed)?;
        tx.commit().map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod listed {
    /// A migration file added to the directory but not to [`super::MIGRATIONS`] would never run.
    #[test]
    fn every_migration_file_is_listed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store/migrations/sqlite");
        let files = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sql"))
            .count();
        assert_eq!(files, super::MIGRATIONS.len(), "every file in {dir} must be listed in MIGRATIONS");
    }
}
