//! A process that dies after its commits reached the journal but before any checkpoint:
//! the next process to open each shard replays them, and the dead journal is deleted once
//! every shard it held was replayed.
//!
//! The dying process is this test binary run again with `CRASH_CHILD_DIR` set: it commits
//! and then aborts, skipping every drop and checkpoint.
//!
//! Also: a process that takes over a shard another process acquired last and closed cleanly
//! (its journal gone) journals its commits where the next opener replays them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flowgrid_model::{RunId, ShardId};
use flowgrid_store::{keys, ShardStore, Store, StoreLimits, WriteBatch};
use flowgrid_store_redb::RedbStore;

const CHILD_ENV: &str = "CRASH_CHILD_DIR";
const SHARDS: [u32; 2] = [5, 6];
const COMMITS: u64 = 50;
/// The shard one process acquires and closes cleanly and the next one commits to.
const TAKEN_OVER: u32 = 7;

fn run(index: u64) -> RunId {
    RunId(format!("run-{index}").into())
}

/// Runs in the child: commits, then dies without a checkpoint.
async fn commit_then_abort(dir: &Path) {
    let store =
        RedbStore::open(dir, StoreLimits::default()).unwrap().with_checkpoint_interval(Duration::from_secs(3600));
    for shard in SHARDS {
        let opened = store.open_shard(ShardId(shard)).await.unwrap();
        let epoch = opened.acquire().await.unwrap();
        for index in 0..COMMITS {
            let mut batch = WriteBatch::new();
            batch.set(keys::run(&run(index)), format!("{shard}:{index}").into_bytes());
            if index > 0 {
                batch.clear(keys::active(&run(index - 1)));
            }
            batch.set(keys::active(&run(index)), Vec::new());
            opened.commit(epoch, batch).await.unwrap();
        }
        std::mem::forget(opened);
    }
    std::process::abort();
}

/// Runs in the child: opens the shard another process closed cleanly, commits two values
/// with the epoch it reads (acquiring the shard when that is refused), and dies without a
/// checkpoint.
async fn commit_to_a_shard_taken_over_then_abort(dir: &Path) {
    let store =
        RedbStore::open(dir, StoreLimits::default()).unwrap().with_checkpoint_interval(Duration::from_secs(3600));
    let opened = store.open_shard(ShardId(TAKEN_OVER)).await.unwrap();
    let mut epoch = opened.current_epoch().await.unwrap();
    for index in 1..=2 {
        let mut batch = WriteBatch::new();
        batch.set(keys::run(&run(index)), format!("b:{index}").into_bytes());
        if let Err(refused) = opened.commit(epoch, batch.clone()).await {
            assert!(refused.to_string().contains("acquire the shard before committing to it"), "{refused}");
            epoch = opened.acquire().await.unwrap();
            opened.commit(epoch, batch).await.unwrap();
        }
    }
    std::mem::forget(opened);
    std::process::abort();
}

/// Runs `test` again as a child process that commits into `dir` and aborts.
fn crash_child(test: &str, dir: &Path) {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(CHILD_ENV, dir)
        .status()
        .unwrap();
    assert!(!status.success(), "the child process was meant to abort");
    let journals = std::fs::read_dir(dir.join("journal")).unwrap().count();
    assert_eq!(journals, 1, "the dead process left its journal");
    assert_eq!(marks(dir), 1, "and its writer's mark");
}

/// How many writers are marked as holding commits in their journals.
fn marks(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("journal-writers")).map_or(0, |entries| entries.count())
}

#[tokio::test]
async fn commits_in_the_journal_survive_a_crash_before_any_checkpoint() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        commit_then_abort(Path::new(&dir)).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    crash_child("commits_in_the_journal_survive_a_crash_before_any_checkpoint", dir.path());

    let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
    for shard in SHARDS {
        let opened = store.open_shard(ShardId(shard)).await.unwrap();
        assert_eq!(opened.current_epoch().await.unwrap().0, 1, "the epoch acquired before the crash");
        for index in 0..COMMITS {
            let value = opened.get(&keys::run(&run(index))).await.unwrap();
            assert_eq!(value, Some(format!("{shard}:{index}").into_bytes()), "shard {shard} run {index}");
        }
        let active = opened.scan(keys::active_range(), usize::MAX, false).await.unwrap();
        assert_eq!(active.len(), 1, "only the last run is active: the clears were replayed too");
        opened.close().unwrap();
    }
    // Every shard the dead process left dirty was replayed: its journal is garbage now.
    let replayed = std::fs::read_dir(dir.path().join("journal")).unwrap().next().unwrap().unwrap().path();
    let noted = std::fs::read_to_string(replayed.join("replayed")).unwrap();
    let notes = noted.lines().filter(|line| !line.is_empty()).count();
    assert_eq!(notes, SHARDS.len(), "each replayed shard is noted: {noted}");

    // A second opening replays nothing twice and the data is now in the file itself. The
    // first store goes first, so that its checkpointer is not sweeping the dead journal (and
    // holding its lock) when the second one's first sweep looks at it.
    drop(store);
    let again = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
    let opened = again.open_shard(ShardId(SHARDS[0])).await.unwrap();
    let epoch = opened.acquire().await.unwrap();
    assert_eq!(epoch.0, 2);
    assert_eq!(opened.scan(keys::run_range(), usize::MAX, false).await.unwrap().len(), COMMITS as usize);
    // The checkpointer of a store sweeps dead journals when it starts, then once a minute: a
    // first sweep that found the journal still locked by a sweep of the dropped store's
    // checkpointer leaves it to the next one.
    let deadline = std::time::Instant::now() + Duration::from_secs(75);
    while replayed.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!replayed.exists(), "the dead journal {} was not deleted", replayed.display());
    assert_eq!(marks(dir.path()), 0, "the dead writer's mark went with its journal");
}

#[tokio::test]
async fn a_journal_deleted_by_hand_is_refused_until_the_loss_is_accepted() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        commit_then_abort(Path::new(&dir)).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    crash_child("a_journal_deleted_by_hand_is_refused_until_the_loss_is_accepted", dir.path());
    // The commits are only in the journal, and someone deletes it.
    std::fs::remove_dir_all(dir.path().join("journal")).unwrap();
    let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
    for shard in SHARDS {
        let refused = store.open_shard(ShardId(shard)).await.expect_err("a shard whose journal is gone is refused");
        let message = refused.to_string();
        assert!(
            matches!(refused, flowgrid_store::Error::Corrupt { .. })
                && message.contains(&format!("shard {shard}'s last commits"))
                && message.contains("journal-writers"),
            "{message}"
        );
    }
    // Deleting the mark, as the refusal says, serves each shard with what its file holds.
    let mark = std::fs::read_dir(dir.path().join("journal-writers")).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(mark).unwrap();
    for shard in SHARDS {
        let opened = store.open_shard(ShardId(shard)).await.unwrap();
        assert_eq!(opened.current_epoch().await.unwrap().0, 1, "the epoch was in the file");
        assert!(opened.scan(keys::run_range(), usize::MAX, false).await.unwrap().is_empty(), "the commits are lost");
        opened.close().unwrap();
    }
}

#[tokio::test]
async fn commits_to_a_shard_taken_over_from_a_clean_process_survive_a_crash() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        commit_to_a_shard_taken_over_then_abort(Path::new(&dir)).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The first process acquires the shard, commits and stops cleanly: its journal is
    // deleted, and the shard file still names it as the journal of the shard's commits.
    let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
    let shard = store.open_shard(ShardId(TAKEN_OVER)).await.unwrap();
    let epoch = shard.acquire().await.unwrap();
    let mut batch = WriteBatch::new();
    batch.set(keys::run(&run(0)), b"a".to_vec());
    shard.commit(epoch, batch).await.unwrap();
    shard.close().unwrap();
    drop(store);
    let journals = || std::fs::read_dir(dir.path().join("journal")).map_or(0, |entries| entries.count());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while journals() > 0 {
        assert!(std::time::Instant::now() < deadline, "the clean process's journal was not deleted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    crash_child("commits_to_a_shard_taken_over_from_a_clean_process_survive_a_crash", dir.path());

    let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
    let opened = store.open_shard(ShardId(TAKEN_OVER)).await.unwrap();
    assert_eq!(opened.get(&keys::run(&run(0))).await.unwrap(), Some(b"a".to_vec()), "the first process's commit");
    for index in 1..=2 {
        let value = opened.get(&keys::run(&run(index))).await.unwrap();
        assert_eq!(value, Some(format!("b:{index}").into_bytes()), "commit {index}, answered Ok, lost in the crash");
    }
    opened.close().unwrap();
}
