//! The contract every store backend passes, as async functions a backend's tests call.
//!
//! Each function takes `make`, which must return a store over the same key space every
//! time it is called (the durability test drops the first store and calls `make` again),
//! configured with [`StoreLimits::default`], and empty when the suite starts. Every test
//! works in its own shard, so the whole suite can share one key space ([`run_all`]) or each
//! test can get a fresh one.
//!
//! A failure panics with a message naming the broken promise.
//!
//! [`a_second_owner_fences_the_first`] is not part of [`run_all`]: it needs two stores
//! holding one shard at once, which only a backend without a per-process shard lock allows
//! (see its docs).
//!
//! ```ignore
//! #[tokio::test]
//! async fn contract() {
//!     let dir = tempfile::tempdir().unwrap();
//!     flowgrid_store::contract::run_all(|| MyStore::open(dir.path()).unwrap()).await;
//! }
//! ```

use std::future::Future;
use std::pin::pin;
use std::task::Poll;

use flowgrid_model::{Epoch, RunId, ShardId};

use crate::{
    join_chunks, join_records, keys, Error, Key, KeyRange, RecordPage, ShardStore, Store, StoreLimits, Value,
    WriteBatch,
};

/// Runs every contract test in turn against stores from `make`.
pub async fn run_all<S: Store>(make: impl Fn() -> S) {
    acquire_bumps_the_epoch(&make).await;
    commit_with_the_current_epoch_is_readable(&make).await;
    commit_with_a_stale_epoch_fails_and_changes_nothing(&make).await;
    batch_over_a_limit_writes_nothing(&make).await;
    values_and_keys_at_the_limit_pass_and_one_byte_over_fails(&make).await;
    scan_orders_limits_and_stays_in_range(&make).await;
    clear_and_clear_range_remove_keys(&make).await;
    chunked_record_round_trips_at_1_1_megabytes(&make).await;
    scan_records_pages_whole_records(&make).await;
    scan_records_says_no_more_after_a_chunked_last_record(&make).await;
    reverse_scans_of_large_values_mirror_forward_scans(&make).await;
    shards_are_independent(&make).await;
    committed_data_survives_reopening(&make).await;
}

fn run_id(text: &str) -> RunId {
    RunId(text.into())
}

async fn open<S: Store>(store: &S, shard: ShardId) -> S::Shard {
    store.open_shard(shard).await.unwrap_or_else(|error| panic!("opening shard {shard} failed: {error}"))
}

async fn commit_ok<T: ShardStore>(shard: &T, epoch: Epoch, batch: WriteBatch) {
    shard.commit(epoch, batch).await.unwrap_or_else(|error| panic!("commit with epoch {epoch} failed: {error}"));
}

async fn get<T: ShardStore>(shard: &T, key: &[u8]) -> Option<Value> {
    shard.get(key).await.unwrap_or_else(|error| panic!("get failed: {error}"))
}

async fn scan<T: ShardStore>(shard: &T, range: KeyRange, limit: usize, reverse: bool) -> Vec<(Key, Value)> {
    shard.scan(range, limit, reverse).await.unwrap_or_else(|error| panic!("scan failed: {error}"))
}

/// One page of `scan_records` without a byte bound.
async fn scan_records<T: ShardStore>(shard: &T, range: KeyRange, limit: usize) -> RecordPage {
    shard
        .scan_records(range, limit, usize::MAX)
        .await
        .unwrap_or_else(|error| panic!("scan_records (limit {limit}) failed: {error}"))
}

fn keys_of(pairs: &[(Key, Value)]) -> Vec<Key> {
    pairs.iter().map(|(key, _)| key.clone()).collect()
}

/// Runs two futures at once, polled in turn on the calling task, and returns both outputs.
async fn join<A: Future, B: Future>(first: A, second: B) -> (A::Output, B::Output) {
    let (mut first, mut second) = (pin!(first), pin!(second));
    let (mut first_out, mut second_out) = (None, None);
    std::future::poll_fn(|cx| {
        if first_out.is_none() {
            if let Poll::Ready(out) = first.as_mut().poll(cx) {
                first_out = Some(out);
            }
        }
        if second_out.is_none() {
            if let Poll::Ready(out) = second.as_mut().poll(cx) {
                second_out = Some(out);
            }
        }
        if first_out.is_some() && second_out.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    (first_out.expect("polled to completion"), second_out.expect("polled to completion"))
}

/// Deterministic, incompressible-looking bytes (xorshift), so chunk boundaries matter.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A fresh shard starts at epoch 0; each acquire returns the next epoch and stores it.
pub async fn acquire_bumps_the_epoch<S: Store>(make: impl Fn() -> S) {
    let store = make();
    let shard = open(&store, ShardId(101)).await;
    assert_eq!(shard.current_epoch().await.unwrap(), Epoch(0), "a fresh shard is at epoch 0");
    assert_eq!(shard.acquire().await.unwrap(), Epoch(1), "the first acquire returns epoch 1");
    assert_eq!(shard.acquire().await.unwrap(), Epoch(2), "the second acquire returns epoch 2");
    assert_eq!(shard.current_epoch().await.unwrap(), Epoch(2), "acquire stores the epoch it returns");
}

/// A commit with the current epoch applies its sets and is readable by get and scan.
pub async fn commit_with_the_current_epoch_is_readable<S: Store>(make: impl Fn() -> S) {
    let store = make();
    let shard = open(&store, ShardId(102)).await;
    let epoch = shard.acquire().await.unwrap();
    let run = run_id("run-1");
    let mut batch = WriteBatch::new();
    batch.set(keys::run(&run), b"record".to_vec());
    batch.set(keys::active(&run), Vec::new());
    commit_ok(&shard, epoch, batch).await;
    assert_eq!(get(&shard, &keys::run(&run)).await, Some(b"record".to_vec()));
    assert_eq!(get(&shard, &keys::active(&run)).await, Some(Vec::new()), "an empty value is a present value");
    assert_eq!(get(&shard, &keys::snapshot(&run)).await, None, "an unwritten key is absent");
    let active = scan(&shard, keys::active_range(), usize::MAX, false).await;
    assert_eq!(active, vec![(keys::active(&run), Vec::new())]);
    commit_ok(&shard, epoch, WriteBatch::new()).await;
}

/// After another acquire, a commit with the old epoch fails with `StaleEpoch` naming both
/// epochs, and none of its mutations is visible; the new epoch still commits.
pub async fn commit_with_a_stale_epoch_fails_and_changes_nothing<S: Store>(make: impl Fn() -> S) {
    let store = make();
    let shard = open(&store, ShardId(103)).await;
    let old = shard.acquire().await.unwrap();
    let mut first = WriteBatch::new();
    first.set(keys::run(&run_id("kept")), b"v1".to_vec());
    commit_ok(&shard, old, first).await;
    let new = shard.acquire().await.unwrap();
    let mut stale = WriteBatch::new();
    stale.set(keys::run(&run_id("kept")), b"overwritten".to_vec());
    stale.set(keys::run(&run_id("new")), b"v".to_vec());
    stale.clear_range(keys::active_range());
    match shard.commit(old, stale).await {
        Err(Error::StaleEpoch { shard: shard_id, epoch, current }) => {
            assert_eq!((shard_id, epoch, current), (ShardId(103), old, new), "StaleEpoch names the epochs");
        }
        other => panic!("a commit with a stale epoch must fail with StaleEpoch, got {other:?}"),
    }
    assert_eq!(get(&shard, &keys::run(&run_id("kept"))).await, Some(b"v1".to_vec()), "stale commit changed a key");
    assert_eq!(get(&shard, &keys::run(&run_id("new"))).await, None, "stale commit wrote a key");
    assert!(
        matches!(shard.commit(old, WriteBatch::new()).await, Err(Error::StaleEpoch { .. })),
        "even an empty batch is fenced"
    );
    assert!(
        matches!(shard.commit(Epoch(new.0 + 1), WriteBatch::new()).await, Err(Error::StaleEpoch { .. })),
        "an epoch from the future is refused too"
    );
    let mut fresh = WriteBatch::new();
    fresh.set(keys::run(&run_id("new")), b"v".to_vec());
    commit_ok(&shard, new, fresh).await;
    assert_eq!(get(&shard, &keys::run(&run_id("new"))).await, Some(b"v".to_vec()));
}

/// A batch with one mutation over a limit fails as a whole: nothing of it is written.
pub async fn batch_over_a_limit_writes_nothing<S: Store>(make: impl Fn() -> S) {
    let limits = StoreLimits::default();
    let store = make();
    let shard = open(&store, ShardId(104)).await;
    let epoch = shard.acquire().await.unwrap();
    let good_key = keys::run(&run_id("good"));

    let mut value_over = WriteBatch::new();
    value_over.set(good_key.clone(), b"v".to_vec());
    value_over.set(keys::run(&run_id("big")), vec![0u8; limits.value_bytes_max + 1]);
    assert!(matches!(shard.commit(epoch, value_over).await, Err(Error::TooLarge { what: "value", .. })));

    let mut key_over = WriteBatch::new();
    key_over.set(good_key.clone(), b"v".to_vec());
    key_over.set(vec![b'k'; limits.key_bytes_max + 1], b"v".to_vec());
    assert!(matches!(shard.commit(epoch, key_over).await, Err(Error::TooLarge { what: "key", .. })));

    let mut transaction_over = WriteBatch::new();
    transaction_over.set(good_key.clone(), b"v".to_vec());
    let per_value = limits.value_bytes_max;
    for index in 0..=(limits.transaction_bytes_max / per_value) as u64 {
        transaction_over.set(keys::history(&run_id("good"), index), vec![1u8; per_value]);
    }
    assert!(matches!(shard.commit(epoch, transaction_over).await, Err(Error::TooLarge { what: "transaction", .. })));

    let mut reserved = WriteBatch::new();
    reserved.set(good_key.clone(), b"v".to_vec());
    reserved.set(keys::epoch(), keys::encode_epoch(Epoch(99)));
    assert!(matches!(shard.commit(epoch, reserved).await, Err(Error::ReservedKey { .. })));

    assert_eq!(get(&shard, &good_key).await, None, "a refused batch wrote its valid mutation");
    assert!(scan(&shard, keys::history_range(&run_id("good")), usize::MAX, false).await.is_empty());
    assert_eq!(shard.current_epoch().await.unwrap(), epoch, "a refused batch changed the epoch");
}

/// Values and keys of exactly the limit commit; one byte more is refused.
pub async fn values_and_keys_at_the_limit_pass_and_one_byte_over_fails<S: Store>(make: impl Fn() -> S) {
    let limits = StoreLimits::default();
    let store = make();
    let shard = open(&store, ShardId(105)).await;
    let epoch = shard.acquire().await.unwrap();
    let value_key = keys::run(&run_id("at-limit"));
    let mut at_limit = WriteBatch::new();
    at_limit.set(value_key.clone(), pattern(limits.value_bytes_max, 5));
    let long_key = vec![b'k'; limits.key_bytes_max];
    at_limit.set(long_key.clone(), b"v".to_vec());
    commit_ok(&shard, epoch, at_limit).await;
    assert_eq!(get(&shard, &value_key).await, Some(pattern(limits.value_bytes_max, 5)));
    assert_eq!(get(&shard, &long_key).await, Some(b"v".to_vec()));

    let mut value_over = WriteBatch::new();
    value_over.set(value_key.clone(), vec![0u8; limits.value_bytes_max + 1]);
    match shard.commit(epoch, value_over).await {
        Err(Error::TooLarge { what: "value", size, limit }) => {
            assert_eq!((size, limit), (limits.value_bytes_max + 1, limits.value_bytes_max));
        }
        other => panic!("a value one byte over the limit must fail with TooLarge, got {other:?}"),
    }
    let mut key_over = WriteBatch::new();
    key_over.set(vec![b'k'; limits.key_bytes_max + 1], b"v".to_vec());
    match shard.commit(epoch, key_over).await {
        Err(Error::TooLarge { what: "key", size, limit }) => {
            assert_eq!((size, limit), (limits.key_bytes_max + 1, limits.key_bytes_max));
        }
        other => panic!("a key one byte over the limit must fail with TooLarge, got {other:?}"),
    }
    assert_eq!(get(&shard, &value_key).await, Some(pattern(limits.value_bytes_max, 5)), "a refused value was written");
}

/// Scans return keys in order (or reverse order), honour the limit, and never leave their
/// range, even when neighbouring ranges hold keys.
pub async fn scan_orders_limits_and_stays_in_range<S: Store>(make: impl Fn() -> S) {
    let store = make();
    let shard = open(&store, ShardId(106)).await;
    let epoch = shard.acquire().await.unwrap();
    let ids = ["run-c", "run-a", "run-e", "run-b", "run-d"];
    let mut batch = WriteBatch::new();
    for (index, id) in ids.iter().enumerate() {
        let run = run_id(id);
        batch.set(keys::active(&run), id.as_bytes().to_vec());
        batch.set(keys::run(&run), b"record".to_vec());
        batch.set(keys::created(1_000 - index as u64, &run), Vec::new());
    }
    batch.set(keys::catalog("flow", 1), b"definition".to_vec());
    commit_ok(&shard, epoch, batch).await;

    let sorted: Vec<Key> =
        ["run-a", "run-b", "run-c", "run-d", "run-e"].iter().map(|id| keys::active(&run_id(id))).collect();
    let forward = scan(&shard, keys::active_range(), usize::MAX, false).await;
    assert_eq!(keys_of(&forward), sorted, "forward scan is in key order and holds only its range");
    assert_eq!(forward[0].1, b"run-a".to_vec(), "scan returns values with their keys");
    let reverse = scan(&shard, keys::active_range(), usize::MAX, true).await;
    let mut reversed = sorted.clone();
    reversed.reverse();
    assert_eq!(keys_of(&reverse), reversed, "reverse scan is in reverse key order");
    assert_eq!(keys_of(&scan(&shard, keys::active_range(), 2, false).await), sorted[..2].to_vec(), "limit, forward");
    assert_eq!(keys_of(&scan(&shard, keys::active_range(), 2, true).await), reversed[..2].to_vec(), "limit, reverse");
    assert!(scan(&shard, keys::active_range(), 0, false).await.is_empty(), "limit 0 returns nothing");

    let newest_first = scan(&shard, keys::created_range(), 1, true).await;
    assert_eq!(keys::decode_created(&newest_first[0].0).unwrap(), (1_000, run_id("run-c")), "created index, newest");
    let catalog = scan(&shard, keys::catalog_range(), usize::MAX, false).await;
    assert_eq!(keys_of(&catalog), vec![keys::catalog("flow", 1)]);
    assert!(scan(&shard, keys::catalog_flow_range("flo"), usize::MAX, false).await.is_empty(), "flow range is exact");

    let middle = KeyRange { begin: keys::active(&run_id("run-b")), end: keys::active(&run_id("run-d")) };
    assert_eq!(keys_of(&scan(&shard, middle, usize::MAX, false).await), sorted[1..3].to_vec(), "begin in, end out");
    let backwards = KeyRange { begin: keys::active(&run_id("run-d")), end: keys::active(&run_id("run-b")) };
    assert!(scan(&shard, backwards, usize::MAX, false).await.is_empty(), "a range with begin > end is empty");
    let prefix = KeyRange::prefix(&keys::active(&run_id("run-a"))[..5]);
    assert_eq!(scan(&shard, prefix, usize::MAX, false).await.len(), 5, "a raw byte prefix range");
}

/// `clear` removes one key; `clear_range` removes exactly `[begin, end)`; mutations apply
/// in order within a batch.
pub async fn clear_and_clear_range_remove_keys<S: Store>(make: impl Fn() -> S) {
    let store = make();
    let shard = open(&store, ShardId(107)).await;
    let epoch = shard.acquire().await.unwrap();
    let ids: Vec<RunId> = (0..6).map(|index| run_id(&format!("run-{index}"))).collect();
    let mut batch = WriteBatch::new();
    for id in &ids {
        batch.set(keys::active(id), Vec::new());
        batch.set(keys::run(id), b"record".to_vec());
    }
    commit_ok(&shard, epoch, batch).await;

    let mut clears = WriteBatch::new();
    clears.clear(keys::run(&ids[0]));
    clears.clear(keys::run(&run_id("never-written")));
    clears.clear_range(KeyRange { begin: keys::active(&ids[1]), end: keys::active(&ids[4]) });
    commit_ok(&shard, epoch, clears).await;
    assert_eq!(get(&shard, &keys::run(&ids[0])).await, None, "clear removed the key");
    assert_eq!(get(&shard, &keys::run(&ids[1])).await, Some(b"record".to_vec()), "clear removed only its key");
    let active = scan(&shard, keys::active_range(), usize::MAX, false).await;
    let expected: Vec<Key> = [0, 4, 5].iter().map(|&index| keys::active(&ids[index])).collect();
    assert_eq!(keys_of(&active), expected, "clear_range removed [begin, end) only");

    let mut ordered = WriteBatch::new();
    ordered.clear_range(keys::active_range());
    ordered.set(keys::active(&ids[2]), b"again".to_vec());
    ordered.set(keys::run(&ids[3]), b"first".to_vec());
    ordered.clear(keys::run(&ids[3]));
    commit_ok(&shard, epoch, ordered).await;
    let active = scan(&shard, keys::active_range(), usize::MAX, false).await;
    assert_eq!(active, vec![(keys::active(&ids[2]), b"again".to_vec())], "a set after a range clear survives");
    assert_eq!(get(&shard, &keys::run(&ids[3])).await, None, "a clear after a set wins");
}

/// A 1.1 MB record written with `set_chunked` reads back byte for byte; rewriting it
/// smaller leaves no stale chunk; `get_chunked` reads it at every chunk count; many
/// chunked records in one range join in order.
pub async fn chunked_record_round_trips_at_1_1_megabytes<S: Store>(make: impl Fn() -> S) {
    let limits = StoreLimits::default();
    let store = make();
    let shard = open(&store, ShardId(108)).await;
    let epoch = shard.acquire().await.unwrap();
    let run = run_id("run-big");
    let record_key = keys::snapshot(&run);
    let big = pattern(1_100_000, 11);
    let mut batch = WriteBatch::new();
    assert_eq!(batch.set_chunked(&record_key, &big, &limits), 11);
    commit_ok(&shard, epoch, batch).await;
    let chunks = scan(&shard, keys::chunks_range(&record_key), usize::MAX, false).await;
    assert_eq!(chunks.len(), 11);
    assert!(join_chunks(chunks).unwrap().as_ref() == Some(&big), "a 1.1 MB record read back differs");
    assert!(shard.get_chunked(&record_key).await.unwrap() == Some(big), "get_chunked joins 11 chunks");

    let small = pattern(150_000, 12);
    let mut rewrite = WriteBatch::new();
    rewrite.set_chunked(&record_key, &small, &limits);
    commit_ok(&shard, epoch, rewrite).await;
    let chunks = scan(&shard, keys::chunks_range(&record_key), usize::MAX, false).await;
    assert_eq!(chunks.len(), 2, "rewriting a record smaller leaves no stale chunk");
    assert!(join_chunks(chunks).unwrap().as_ref() == Some(&small));
    assert!(shard.get_chunked(&record_key).await.unwrap() == Some(small), "get_chunked joins two chunks");

    // One chunk, then three again: the point read of chunk 0 of 1 must not answer for a
    // record that has more chunks now.
    for (size, seed, count) in [(1_000, 13, 1), (250_000, 14, 3)] {
        let value = pattern(size, seed);
        let mut rewrite = WriteBatch::new();
        assert_eq!(rewrite.set_chunked(&record_key, &value, &limits), count);
        commit_ok(&shard, epoch, rewrite).await;
        let read = shard.get_chunked(&record_key).await.unwrap();
        assert!(read == Some(value), "get_chunked after rewriting the record as {count} chunk(s) differs");
    }
    assert_eq!(shard.get_chunked(&keys::snapshot(&run_id("run-none"))).await.unwrap(), None);

    let mut events = WriteBatch::new();
    for seq in 1..=3u64 {
        events.set_chunked(&keys::history(&run, seq), &pattern(seq as usize * 90_000, seq), &limits);
    }
    commit_ok(&shard, epoch, events).await;
    let history = scan(&shard, keys::history_range(&run), usize::MAX, false).await;
    let records = join_records(history).unwrap();
    assert_eq!(records.len(), 3);
    for (index, (key, value)) in records.iter().enumerate() {
        let seq = index as u64 + 1;
        assert_eq!(keys::decode_history(key).unwrap(), (run.clone(), seq), "history records in seq order");
        assert!(*value == pattern(seq as usize * 90_000, seq), "history record {seq} differs");
    }
}

/// `scan_records` pages through records of one to three chunks: every record whole, in
/// order, none twice or missed, pages of at most `limit` records (a record larger than the
/// page's first scan included), ending before `bytes_max`, and `more` false only on the last.
pub async fn scan_records_pages_whole_records<S: Store>(make: impl Fn() -> S) {
    let limits = StoreLimits::default();
    let store = make();
    let shard = open(&store, ShardId(109)).await;
    let epoch = shard.acquire().await.unwrap();
    let run = run_id("run-paged");
    // Records 1..=7 of 1, 3, 1, 1, 2, 1 and 1 chunks: ten keys.
    let sizes = [100, 250_000, 120, 130, 150_000, 140, 150];
    let mut batch = WriteBatch::new();
    for (index, size) in sizes.iter().enumerate() {
        let seq = index as u64 + 1;
        batch.set_chunked(&keys::history(&run, seq), &pattern(*size, seq), &limits);
    }
    commit_ok(&shard, epoch, batch).await;
    let all = join_records(scan(&shard, keys::history_range(&run), usize::MAX, false).await).unwrap();
    assert_eq!(all.len(), 7);

    for (limit, bytes_max) in [
        (1, usize::MAX),
        (2, usize::MAX),
        (5, usize::MAX),
        (7, usize::MAX),
        (100, usize::MAX),
        (3, 1),
        (usize::MAX, usize::MAX),
    ] {
        let mut read = Vec::new();
        let mut begin = keys::history_range(&run).begin;
        loop {
            let range = KeyRange { begin: begin.clone(), end: keys::history_range(&run).end };
            let RecordPage { records, more } = shard
                .scan_records(range, limit, bytes_max)
                .await
                .unwrap_or_else(|error| panic!("scan_records (limit {limit}) failed: {error}"));
            let expected_len = if bytes_max == 1 { 1 } else { limit.min(all.len() - read.len()) };
            assert_eq!(records.len(), expected_len, "page {} with limit {limit}, bytes_max {bytes_max}", read.len());
            read.extend(records);
            assert_eq!(more, read.len() < all.len(), "more after {} of 7 records (limit {limit})", read.len());
            if !more {
                break;
            }
            begin = keys::chunks_range(&read.last().unwrap().0).end;
        }
        assert!(read == all, "paging with limit {limit}, bytes_max {bytes_max} read other records than one scan");
    }
    let empty = shard.scan_records(keys::history_range(&run_id("run-none")), 10, usize::MAX).await.unwrap();
    assert_eq!(empty, RecordPage::default(), "an empty range is an empty page with nothing more");
}

/// `more` is true only when records follow the page, also when the window a backend reads
/// past the page is taken up by the chunks of the page's last record: a page that ends
/// with the range's last record, a chunked one, says nothing more follows.
pub async fn scan_records_says_no_more_after_a_chunked_last_record<S: Store>(make: impl Fn() -> S) {
    let limits = StoreLimits::default();
    let store = make();
    let shard = open(&store, ShardId(113)).await;
    let epoch = shard.acquire().await.unwrap();
    let run = run_id("run-chunked-last");
    // Record 1 of one chunk, record 2 of two: three keys.
    let mut batch = WriteBatch::new();
    batch.set_chunked(&keys::history(&run, 1), &pattern(100, 1), &limits);
    assert_eq!(batch.set_chunked(&keys::history(&run, 2), &pattern(150_000, 2), &limits), 2);
    commit_ok(&shard, epoch, batch).await;
    let range = keys::history_range(&run);

    let both = scan_records(&shard, range.clone(), 2).await;
    assert_eq!(keys_of(&both.records), vec![keys::history(&run, 1), keys::history(&run, 2)]);
    assert!(both.records[1].1 == pattern(150_000, 2), "the chunked record read back differs");
    assert!(!both.more, "a page holding the range's last record (of two chunks) says more records follow");

    let first = scan_records(&shard, range.clone(), 1).await;
    assert_eq!(keys_of(&first.records), vec![keys::history(&run, 1)]);
    assert!(first.more, "a page of record 1 says no record follows, though record 2 does");

    let rest = KeyRange { begin: keys::chunks_range(&keys::history(&run, 1)).end, end: range.end.clone() };
    let last = scan_records(&shard, rest, 1).await;
    assert_eq!(keys_of(&last.records), vec![keys::history(&run, 2)]);
    assert!(!last.more, "a page of the last record alone (of two chunks) says more records follow");

    let roomy = scan_records(&shard, range, 3).await;
    assert_eq!((roomy.records.len(), roomy.more), (2, false), "a page with room to spare");
}

/// Scans over many large values (40 of 30 KB: many read batches of a backend that reads
/// in batches of about 80 KB) return in reverse exactly the pairs they return forward, with
/// and without a limit.
pub async fn reverse_scans_of_large_values_mirror_forward_scans<S: Store>(make: impl Fn() -> S) {
    const PAIRS: usize = 40;
    const VALUE_BYTES: usize = 30_000;
    const LIMIT: usize = 25;
    let store = make();
    let shard = open(&store, ShardId(114)).await;
    let epoch = shard.acquire().await.unwrap();
    let mut batch = WriteBatch::new();
    for index in 0..PAIRS {
        batch.set(keys::active(&run_id(&format!("run-{index:02}"))), pattern(VALUE_BYTES, index as u64 + 1));
    }
    commit_ok(&shard, epoch, batch).await;

    let forward = scan(&shard, keys::active_range(), usize::MAX, false).await;
    assert_eq!(forward.len(), PAIRS, "a forward scan returns every pair");
    assert!(forward.iter().all(|(_, value)| value.len() == VALUE_BYTES), "a forward scan returns whole values");
    let mut reversed = forward.clone();
    reversed.reverse();
    let reverse = scan(&shard, keys::active_range(), usize::MAX, true).await;
    assert_eq!(keys_of(&reverse), keys_of(&reversed), "an unlimited reverse scan is the forward scan reversed");
    assert!(reverse == reversed, "an unlimited reverse scan returns other values than the forward scan");
    let limited = scan(&shard, keys::active_range(), LIMIT, true).await;
    assert_eq!(keys_of(&limited), keys_of(&reversed[..LIMIT]), "a reverse scan of limit {LIMIT}");
    assert!(limited == reversed[..LIMIT], "a reverse scan of limit {LIMIT} returns other values");
    let limited = scan(&shard, keys::active_range(), LIMIT, false).await;
    assert!(limited == forward[..LIMIT], "a forward scan of limit {LIMIT} is the start of the unlimited one");
}

/// Two shards of one store have separate epochs and separate keys.
pub async fn shards_are_independent<S: Store>(make: impl Fn() -> S) {
    let store = make();
    let first = open(&store, ShardId(112)).await;
    let second = open(&store, ShardId(110)).await;
    let first_epoch = first.acquire().await.unwrap();
    first.acquire().await.unwrap();
    let second_epoch = second.acquire().await.unwrap();
    assert_eq!(second_epoch, Epoch(1), "acquiring one shard does not bump another");
    let key = keys::run(&run_id("shared-id"));
    let mut batch = WriteBatch::new();
    batch.set(key.clone(), b"second".to_vec());
    commit_ok(&second, second_epoch, batch).await;
    assert_eq!(get(&first, &key).await, None, "a key written in one shard is visible in another");
    assert!(matches!(first.commit(first_epoch, WriteBatch::new()).await, Err(Error::StaleEpoch { .. })));
}

/// Data committed, the store dropped and made again: the data and the epoch are still
/// there.
pub async fn committed_data_survives_reopening<S: Store>(make: impl Fn() -> S) {
    let run = run_id("durable");
    let epoch = {
        let store = make();
        let shard = open(&store, ShardId(111)).await;
        let epoch = shard.acquire().await.unwrap();
        let mut batch = WriteBatch::new();
        batch.set(keys::run(&run), b"record".to_vec());
        batch.set_chunked(&keys::snapshot(&run), &pattern(250_000, 3), &StoreLimits::default());
        commit_ok(&shard, epoch, batch).await;
        epoch
    };
    let store = make();
    let shard = open(&store, ShardId(111)).await;
    assert_eq!(shard.current_epoch().await.unwrap(), epoch, "the epoch survives reopening");
    assert_eq!(get(&shard, &keys::run(&run)).await, Some(b"record".to_vec()), "a committed key survives reopening");
    let chunks = scan(&shard, keys::chunks_range(&keys::snapshot(&run)), usize::MAX, false).await;
    assert!(join_chunks(chunks).unwrap() == Some(pattern(250_000, 3)), "a chunked record survives reopening");
    assert_eq!(shard.acquire().await.unwrap(), Epoch(epoch.0 + 1), "acquire continues from the stored epoch");
}

/// Fencing between two owners that share nothing but the key space: two stores from
/// `make`, each holding the same shard. After B acquires, A's commit with its epoch fails
/// with `StaleEpoch` and B sees none of it. And in rounds where A commits a large batch
/// ending in a marker while B acquires and then reads the marker: a commit of A's that
/// returns `Ok` was ordered before B's acquire, so B's read sees it; one refused as stale
/// wrote nothing.
///
/// Not in [`run_all`]: only for backends that let two stores hold one shard at once, whose
/// ownership is the epoch alone (FoundationDB). The embedded redb backend cannot run it:
/// its shard file is locked by the store that opens it, so a second store's open fails
/// with [`Error::Busy`] until the first lets go, and two owners never hold a shard at once
/// there (its own tests check that lock).
pub async fn a_second_owner_fences_the_first<S: Store>(make: impl Fn() -> S) {
    const ROUNDS: u64 = 10;
    const BIG_VALUES: u64 = 20;
    const BIG_VALUE_BYTES: usize = 90_000;
    let (store_a, store_b) = (make(), make());
    let a = open(&store_a, ShardId(115)).await;
    let b = open(&store_b, ShardId(115)).await;
    let epoch_a = a.acquire().await.unwrap();
    let epoch_b = b.acquire().await.unwrap();
    assert!(epoch_b > epoch_a, "B's acquire after A's returned {epoch_b}, not past A's {epoch_a}");
    assert_eq!(a.current_epoch().await.unwrap(), epoch_b, "A does not read the epoch B acquired");
    let key = keys::run(&run_id("written-by-a"));
    let mut stale = WriteBatch::new();
    stale.set(key.clone(), b"stale".to_vec());
    match a.commit(epoch_a, stale).await {
        Err(Error::StaleEpoch { epoch, current, .. }) => {
            assert_eq!((epoch, current), (epoch_a, epoch_b), "StaleEpoch names A's epoch and B's");
        }
        other => panic!("A's commit after B acquired the shard must fail with StaleEpoch, got {other:?}"),
    }
    assert_eq!(get(&b, &key).await, None, "B sees the write of A's stale commit");
    assert_eq!(get(&a, &key).await, None, "A's stale commit wrote its key");

    let big = pattern(BIG_VALUE_BYTES, 7);
    for round in 0..ROUNDS {
        let epoch_a = a.acquire().await.unwrap();
        let marker = keys::run(&run_id(&format!("marker-{round}")));
        let mut batch = WriteBatch::new();
        for index in 0..BIG_VALUES {
            batch.set(keys::history(&run_id("fenced"), index), big.clone());
        }
        batch.set(marker.clone(), b"a".to_vec());
        // B reads the marker as soon as it holds the shard, while A's commit may still run.
        let take_over = async {
            let epoch_b =
                b.acquire().await.unwrap_or_else(|error| panic!("round {round}: B's acquire failed: {error}"));
            (epoch_b, get(&b, &marker).await)
        };
        let (committed, (epoch_b, seen_at_acquire)) = join(a.commit(epoch_a, batch), take_over).await;
        assert!(epoch_b > epoch_a, "round {round}: B acquired {epoch_b}, not past A's {epoch_a}");
        match committed {
            Ok(()) => assert_eq!(
                seen_at_acquire,
                Some(b"a".to_vec()),
                "round {round}: A's commit with {epoch_a} returned Ok, yet B does not see it right after acquiring \
                 {epoch_b}: the commit went through after another owner took the shard"
            ),
            Err(Error::StaleEpoch { .. }) => assert_eq!(
                get(&b, &marker).await,
                None,
                "round {round}: A's commit was refused as stale, yet wrote its marker"
            ),
            // May have committed or not: B sees either, and the next round goes on.
            Err(Error::OutcomeUnknown { .. }) => {}
            Err(other) => panic!("round {round}: A's commit failed with neither Ok nor StaleEpoch: {other}"),
        }
    }
}
