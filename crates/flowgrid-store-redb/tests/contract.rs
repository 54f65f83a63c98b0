//! The store contract against the redb backend, one test per promise, plus the promises
//! only a file-per-shard backend makes (file naming, locking, closing).

use std::path::Path;

use flowgrid_model::ShardId;
use flowgrid_store::{contract, keys, Error, ShardStore, Store, StoreLimits, WriteBatch};
use flowgrid_store_redb::RedbStore;

fn store_in(dir: &Path) -> RedbStore {
    RedbStore::open(dir, StoreLimits::default()).expect("open the store directory")
}

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let dir = tempfile::tempdir().expect("create a temporary directory");
                contract::$name(|| store_in(dir.path())).await;
            }
        )*
    };
}

contract_tests!(
    acquire_bumps_the_epoch,
    commit_with_the_current_epoch_is_readable,
    commit_with_a_stale_epoch_fails_and_changes_nothing,
    batch_over_a_limit_writes_nothing,
    values_and_keys_at_the_limit_pass_and_one_byte_over_fails,
    scan_orders_limits_and_stays_in_range,
    clear_and_clear_range_remove_keys,
    chunked_record_round_trips_at_1_1_megabytes,
    scan_records_pages_whole_records,
    scan_records_says_no_more_after_a_chunked_last_record,
    reverse_scans_of_large_values_mirror_forward_scans,
    shards_are_independent,
    committed_data_survives_reopening,
);

// `contract::a_second_owner_fences_the_first` is not run here: it holds one shard in two
// stores at once, and a redb shard file is locked by the store that opens it (a second open
// fails with Busy, see `a_held_shard_is_busy_until_closed`), so two owners never hold it.

#[tokio::test]
async fn whole_suite_shares_one_directory() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    contract::run_all(|| store_in(dir.path())).await;
}

#[tokio::test]
async fn open_creates_the_directory_and_a_zero_padded_file() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let data = dir.path().join("nested").join("data");
    let store = store_in(&data);
    let shard = store.open_shard(ShardId(17)).await.unwrap();
    assert_eq!(shard.path(), data.join("shard-00017.redb"));
    assert!(data.join("shard-00017.redb").is_file());
}

#[tokio::test]
async fn a_held_shard_is_busy_until_closed() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let store = store_in(dir.path());
    let held = store.open_shard(ShardId(3)).await.unwrap();
    let epoch = held.acquire().await.unwrap();
    let other_owner = store_in(dir.path());
    match other_owner.open_shard(ShardId(3)).await {
        Err(Error::Busy { shard, detail }) => {
            assert_eq!(shard, ShardId(3));
            assert!(detail.contains("shard-00003.redb"), "the error names the file: {detail}");
        }
        other => panic!("opening a held shard must fail with Busy, got {other:?}"),
    }
    let mut batch = WriteBatch::new();
    batch.set(keys::run(&flowgrid_model::RunId("r".into())), b"v".to_vec());
    held.commit(epoch, batch).await.unwrap();
    held.close().unwrap();
    let taken = other_owner.open_shard(ShardId(3)).await.expect("a closed shard opens elsewhere");
    let new_epoch = taken.acquire().await.unwrap();
    assert_eq!(new_epoch.0, epoch.0 + 1);
    drop(taken);
    let again = store.open_shard(ShardId(3)).await.expect("a dropped shard opens elsewhere");
    assert_eq!(again.current_epoch().await.unwrap(), new_epoch);
}

/// A handle that has not acquired its shard does not commit, even with the epoch it read: the
/// file names the journal of the last process that acquired it, and a crash would lose a
/// commit journaled elsewhere.
#[tokio::test]
async fn a_commit_before_acquire_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let store = store_in(dir.path());
    let shard = store.open_shard(ShardId(6)).await.unwrap();
    let epoch = shard.current_epoch().await.unwrap();
    let key = keys::run(&flowgrid_model::RunId("r".into()));
    let mut batch = WriteBatch::new();
    batch.set(key.clone(), b"v".to_vec());
    match shard.commit(epoch, batch.clone()).await {
        Err(refused) => {
            assert!(matches!(refused, flowgrid_store::Error::NotAcquired { .. }), "{refused:?}");
            let message = refused.to_string();
            assert!(message.contains("acquire the shard before committing to it"), "{message}");
            assert!(message.contains("shard-00006.redb"), "the refusal names the file: {message}");
        }
        Ok(()) => panic!("a commit on a handle that has not acquired its shard must be refused"),
    }
    assert!(shard.commit(epoch, WriteBatch::new()).await.is_err(), "even an empty batch is refused");
    assert_eq!(shard.get(&key).await.unwrap(), None, "the refused commit wrote its key");
    let acquired = shard.acquire().await.unwrap();
    shard.commit(acquired, batch).await.unwrap();
    assert_eq!(shard.get(&key).await.unwrap(), Some(b"v".to_vec()));
}

#[tokio::test]
async fn a_slow_transaction_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    // A zero-millisecond budget makes any transaction that takes a millisecond too slow.
    let limits = StoreLimits { transaction_ms_max: 0, ..StoreLimits::default() };
    let store = RedbStore::open(dir.path(), limits).unwrap();
    let shard = store.open_shard(ShardId(4)).await.unwrap();
    let epoch = shard.acquire().await.unwrap();
    let mut batch = WriteBatch::new();
    // Enough work that encoding it takes over a millisecond (8 MB), within the transaction's
    // size as FoundationDB counts it.
    for seq in 0..2_000u64 {
        batch.set(keys::history(&flowgrid_model::RunId("slow".into()), seq), vec![7u8; 4_000]);
    }
    match shard.commit(epoch, batch).await {
        Err(Error::TooSlow { limit_ms: 0, .. }) => {}
        other => panic!("a transaction over its time limit must fail with TooSlow, got {other:?}"),
    }
    let written = shard.scan(keys::history_range(&flowgrid_model::RunId("slow".into())), 1, false).await.unwrap();
    assert!(written.is_empty(), "a refused slow transaction wrote data");
}
