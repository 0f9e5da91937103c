//! WAL checkpoints off the writer's path.
//!
//! A checkpoint copies the pages committed to the WAL back into the database file and, with
//! synchronous=FULL, ends with an fsync of that file. SQLite's default runs one on the committing
//! connection each time a commit leaves 1,000 pages in the WAL: on the writer thread, in the way of
//! every write queued behind it. With a long past that copy is a random write per job (each new job's
//! entry lands on a page of the `jobs` key, keyed by the upstream's random IDs, that no recent write
//! touched), so each checkpoint writes back about a thousand pages all over the file.
//!
//! Here a thread of its own, with its own connection, runs passive checkpoints shortly after writes
//! commit; a passive checkpoint never takes the write lock, so the writer goes on meanwhile. It cannot
//! rewind the WAL while writes keep coming, though (SQLite restarts the WAL only once every frame is
//! copied back), so the writer keeps its own automatic checkpoint as the backstop, at
//! [`WRITER_CHECKPOINT_PAGES`]: by then most frames are already copied and little is left for it.
//!
//! Bulk writes are the exception. A retention purge dirties random pages far faster than jobs do, and
//! a checkpoint copying them beside the writer kept the disk busy enough that every commit's fsync
//! waited behind it (registration p99 during a purge of 3,000,000 rows: 98–120 ms, against 26–43 ms
//! with checkpoints on the writer). So while bulk writes run, and for [`BULK_HOLD`] after the last,
//! the checkpointer stands aside and the writer checkpoints as SQLite does by default.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// The WAL size (pages) at which the writer checkpoints itself (SQLite's default is 1,000): 32 MB.
pub(super) const WRITER_CHECKPOINT_PAGES: i64 = 8_000;

/// How long the checkpointer lets commits gather before it copies them back: at most ten checkpoints
/// a second under a steady load, and the WAL copied back this long after the last write when idle.
const GATHER: Duration = Duration::from_millis(100);

/// SQLite's default WAL size for a checkpoint on the committing connection, used during bulk writes.
const DEFAULT_CHECKPOINT_PAGES: i64 = 1_000;

/// How long after the last bulk write the writer keeps checkpointing itself.
const BULK_HOLD: Duration = Duration::from_secs(1);

/// The writer's handle on the checkpointer thread, which ends when this is dropped.
pub(super) struct Checkpointer {
    pokes: SyncSender<()>,
    bulk: Arc<Bulk>,
}

/// Until when bulk writes keep the checkpointer aside, in milliseconds since `since`.
struct Bulk {
    since: Instant,
    until_ms: AtomicU64,
}

impl Bulk {
    fn active(&self) -> bool {
        self.since.elapsed().as_millis() < u128::from(self.until_ms.load(Ordering::Relaxed))
    }
}

impl Checkpointer {
    /// Starts the thread on `conn`, a connection of its own to the store's file.
    pub(super) fn spawn(conn: Connection) -> std::io::Result<Checkpointer> {
        let (pokes, waiting) = sync_channel(1);
        let bulk = Arc::new(Bulk { since: Instant::now(), until_ms: AtomicU64::new(0) });
        let shared = bulk.clone();
        std::thread::Builder::new()
            .name("jobhook-sqlite-checkpoint".into())
            .spawn(move || run(&conn, &waiting, &shared))?;
        Ok(Checkpointer { pokes, bulk })
    }

    /// Something was committed. Never blocks: a poke already waiting covers this one.
    pub(super) fn committed(&self) {
        // Full: a poke already waits. Disconnected: the thread is gone, and the writer's own
        // checkpoint does the work.
        let _ = self.pokes.try_send(());
    }

    /// A bulk write is about to run.
    pub(super) fn bulk(&self) {
        let until = self.bulk.since.elapsed() + BULK_HOLD;
        self.bulk.until_ms.store(u64::try_from(until.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The WAL size (pages) at which the writer should checkpoint itself now.
    pub(super) fn writer_pages(&self) -> i64 {
        if self.bulk.active() { DEFAULT_CHECKPOINT_PAGES } else { WRITER_CHECKPOINT_PAGES }
    }
}

fn run(conn: &Connection, pokes: &Receiver<()>, bulk: &Bulk) {
    let mut failing = false;
    while pokes.recv().is_ok() {
        // Pacing, not waiting for a condition: the commits of the next moment join this checkpoint.
        std::thread::sleep(GATHER);
        let _ = pokes.try_recv();
        if bulk.active() {
            continue; // the writer checkpoints; the next commit after the bulk pokes again
        }
        // (busy, pages in the WAL, pages copied back); a busy checkpoint is simply tried again later.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "a WAL checkpoint failed; the writer's own checkpoint takes over");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::OpenFlags;

    use super::super::{Sq, SqliteStore};
    use super::*;
    use crate::metrics::WriterStats;

    /// The rows in the database file itself, the WAL left aside (`immutable=1` reads the file alone).
    fn rows_in_file(path: &std::path::Path) -> i64 {
        let uri = format!("file:{}?immutable=1", path.display());
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(uri, flags).unwrap();
        conn.query_row("SELECT count(*) FROM probe", [], |r| r.get(0)).unwrap_or(0)
    }

    /// A new store in `dir` with an empty table `probe`, and the store's file.
    async fn store_with_probe(dir: &tempfile::TempDir) -> (SqliteStore, std::path::PathBuf) {
        let path = dir.path().join("store.db");
        let store =
            SqliteStore::open(&format!("sqlite:{}", path.display()), Arc::new(WriterStats::default())).await.unwrap();
        store.exec(|tx| tx.execute_batch("CREATE TABLE probe (n INTEGER)").sq()).await.unwrap();
        (store, path)
    }

    /// A few commits, far below the writer's own checkpoint, reach the database file within moments:
    /// the checkpointer copied them back, not the writer.
    #[tokio::test]
    async fn commits_reach_the_database_file_without_the_writer_checkpointing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = store_with_probe(&dir).await;
        for n in 0..10 {
            store.exec(move |tx| tx.execute("INSERT INTO probe VALUES (?1)", [n]).sq().map(drop)).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while rows_in_file(&path) < 10 {
            assert!(Instant::now() < deadline, "the WAL was not copied back: {} rows in the file", rows_in_file(&path));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A bulk write puts checkpoints back on the writer, at SQLite's default size, for the hold only;
    /// what it wrote still reaches the file once the checkpointer takes over again.
    #[tokio::test]
    async fn a_bulk_write_hands_checkpoints_to_the_writer_for_a_moment() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = store_with_probe(&dir).await;
        let pages = |conn: &Connection| conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get::<_, i64>(0));
        assert_eq!(store.exec(move |tx| pages(tx).sq()).await.unwrap(), WRITER_CHECKPOINT_PAGES);
        assert_eq!(store.exec_bulk(move |tx| pages(tx).sq()).await.unwrap(), DEFAULT_CHECKPOINT_PAGES);
        store.exec_bulk(|tx| tx.execute_batch("INSERT INTO probe VALUES (1), (2), (3)").sq()).await.unwrap();
        let deadline = Instant::now() + BULK_HOLD + Duration::from_secs(10);
        loop {
            let now = store.exec(move |tx| pages(tx).sq()).await.unwrap();
            if now == WRITER_CHECKPOINT_PAGES && rows_in_file(&path) == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "after the hold: {now} pages, {} rows in the file", rows_in_file(&path));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
