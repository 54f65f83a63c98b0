//! The store port. Backends (embedded redb, FoundationDB) are adapters in their own
//! crates; this crate depends on none of them.
//!
//! The shape follows FoundationDB: each shard is an ordered key space of byte keys, a
//! commit is one serializable transaction, and FoundationDB's limits (key 10 KB, value
//! 100 KB, transaction 10 MB and 5 s) are enforced by *every* backend through
//! [`WriteBatch`], so what commits locally commits in a cluster. The default
//! [`StoreLimits`] keep room under the key and transaction limits for the cluster
//! backend's key prefix and conflict ranges.
//!
//! Records larger than one value are chunked ([`WriteBatch::set_chunked`],
//! [`join_chunks`]); the key layout is in [`keys`].
//!
//! Fencing: [`ShardStore::acquire`] bumps the shard's epoch in the store and returns it;
//! [`ShardStore::commit`] checks that epoch inside the same transaction and refuses with
//! [`Error::StaleEpoch`] when another owner has acquired the shard since.

use std::future::Future;

use flowgrid_model::{Epoch, ShardId};

mod batch;
#[cfg(feature = "contract-tests")]
pub mod contract;
pub mod keys;
mod limits;

pub use batch::{chunk_position, join_chunks, join_records, Mutation, WriteBatch};
pub use limits::{StoreLimits, FDB_KEY_BYTES_MAX, FDB_TRANSACTION_BYTES_MAX, FDB_VALUE_BYTES_MAX};

pub type Key = Vec<u8>;
pub type Value = Vec<u8>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another owner acquired the shard after this epoch: stop serving the shard, do not retry.
    #[error("shard {shard}: epoch {epoch} is stale (the store holds {current}); another owner took the shard")]
    StaleEpoch { shard: ShardId, epoch: Epoch, current: Epoch },
    /// A key, value or transaction is over its limit: a bug or an input that should have
    /// been refused earlier; the transaction did not commit.
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge { what: &'static str, size: usize, limit: usize },
    /// The transaction ran longer than the 5 s FoundationDB allows and was not committed.
    #[error("transaction took {elapsed_ms} ms, over the limit of {limit_ms} ms")]
    TooSlow { elapsed_ms: u64, limit_ms: u64 },
    /// Another process holds this shard's file (embedded backend): it is owned elsewhere.
    #[error("shard {shard} is held by another process: {detail}")]
    Busy { shard: ShardId, detail: String },
    /// The batch writes the shard's epoch key, which only [`ShardStore::acquire`] may change
    /// (a write there would defeat fencing): a bug in the caller; nothing was committed.
    #[error("the batch writes the reserved key {key} (the shard epoch); only acquire may change it")]
    ReservedKey { key: String },
    /// A stored key does not decode as the kind its range promises: the shard holds data
    /// this version did not write (corruption, or a newer/older layout). Stop serving the
    /// shard and inspect the key.
    #[error("key {key} is not a well-formed {kind} key ({source}); the shard holds data this version did not write")]
    MalformedKey {
        kind: &'static str,
        key: String,
        #[source]
        source: foundationdb_tuple::PackError,
    },
    /// A stored value (the epoch, a chunked record) is not what this version writes:
    /// corruption, or a scan that cut a chunked record short. Stop serving the shard and
    /// inspect the key named.
    #[error("stored data is inconsistent at {key}: {detail}")]
    Corrupt { key: String, detail: String },
    /// A commit through a handle that has not acquired the shard (embedded backend): a bug
    /// in the caller; nothing was committed.
    #[error("shard {shard}: {detail}")]
    NotAcquired { shard: ShardId, detail: String },
    /// A commit failed after an attempt whose outcome the backend could not tell
    /// (FoundationDB's `commit_unknown_result`): it may have been applied. Read the state
    /// before doing it again.
    #[error("the commit may have been applied: {detail}")]
    OutcomeUnknown { detail: String },
    /// The backend failed (I/O, corruption, cluster unavailable). May be retried; if it
    /// persists, stop serving the shard.
    #[error("store backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// True when the same operation may succeed later unchanged: the backend failed, the
    /// transaction ran too long, or another process held the shard. False when the data,
    /// the batch or the caller is at fault, and for a stale epoch (the shard moved).
    pub fn may_pass_later(&self) -> bool {
        matches!(self, Error::Backend(_) | Error::TooSlow { .. } | Error::Busy { .. })
    }
}

/// A key as readable text for error messages: printable ASCII as is, other bytes as
/// `\xNN` (the form FoundationDB's tools print), cut at 200 bytes.
pub fn printable_key(key: &[u8]) -> String {
    const SHOWN_BYTES_MAX: usize = 200;
    let mut text = String::with_capacity(key.len().min(SHOWN_BYTES_MAX) + 8);
    for &byte in key.iter().take(SHOWN_BYTES_MAX) {
        if byte.is_ascii_graphic() || byte == b' ' {
            text.push(char::from(byte));
        } else {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    if key.len() > SHOWN_BYTES_MAX {
        text.push_str(&format!("... ({} bytes)", key.len()));
    }
    text
}

/// A half-open key range `[begin, end)`. Empty when `begin >= end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub begin: Key,
    pub end: Key,
}

impl KeyRange {
    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> KeyRange {
        let mut end = prefix.to_vec();
        // The smallest key greater than every key with this prefix.
        while let Some(last) = end.pop() {
            if last < 0xFF {
                end.push(last + 1);
                return KeyRange { begin: prefix.to_vec(), end };
            }
        }
        KeyRange { begin: prefix.to_vec(), end: vec![0xFF; prefix.len() + 1] }
    }

    /// True when the range holds no key.
    pub fn is_empty(&self) -> bool {
        self.begin >= self.end
    }

    /// True when `key` lies in `[begin, end)`.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.begin.as_slice() <= key && key < self.end.as_slice()
    }
}

/// A page of whole chunked records from [`ShardStore::scan_records`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordPage {
    /// `(record key, value)` pairs in key order, each record's chunks joined.
    pub records: Vec<(Key, Value)>,
    /// True when the range holds records past the page.
    pub more: bool,
}

/// Opens shards. One per process; cheap to share.
pub trait Store: Send + Sync + 'static {
    type Shard: ShardStore;

    /// Opens `shard` for this process. The embedded backend takes the shard's file lock
    /// here and fails with [`Error::Busy`] while another process holds it.
    fn open_shard(&self, shard: ShardId) -> impl Future<Output = Result<Self::Shard>> + Send;

    /// Why this process can commit nothing more to any shard of the store (the embedded
    /// backend's journal failed a write or a sync), or `None` while it can. A coordinator
    /// then hands its shards to the others and stops.
    fn broken(&self) -> Option<String> {
        None
    }
}

/// One shard's key space, held by its owner.
pub trait ShardStore: Send + Sync + 'static {
    /// Bumps the shard's epoch in one transaction and returns the new epoch. Every commit
    /// made with an older epoch fails from now on.
    fn acquire(&self) -> impl Future<Output = Result<Epoch>> + Send;

    /// The epoch currently in the store.
    fn current_epoch(&self) -> impl Future<Output = Result<Epoch>> + Send;

    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Value>>> + Send;

    /// Up to `limit` pairs of `range` in key order (reverse order if `reverse`).
    fn scan(
        &self,
        range: KeyRange,
        limit: usize,
        reverse: bool,
    ) -> impl Future<Output = Result<Vec<(Key, Value)>>> + Send;

    /// Applies `batch` atomically and durably if the stored epoch still equals `epoch`.
    /// When it returns `Ok`, the batch is on disk (or committed in the cluster). Commit
    /// through a handle that acquired the shard: the embedded store refuses a commit before
    /// ([`Error::NotAcquired`]), as its journal is found through the last acquisition.
    fn commit(&self, epoch: Epoch, batch: WriteBatch) -> impl Future<Output = Result<()>> + Send;

    /// The chunked record at `record_key` (see [`WriteBatch::set_chunked`]), joined;
    /// `None` when it does not exist. A record of one chunk, the usual case, is one point
    /// read; only a larger (or absent) one costs a scan of its chunk range, which for the
    /// embedded backend also means a pass over the shard's writes not yet in its file.
    fn get_chunked(&self, record_key: &[u8]) -> impl Future<Output = Result<Option<Value>>> + Send {
        async move {
            // A record's chunk keys name its chunk count, and writing a record clears its
            // earlier chunks: chunk 0 of 1 is the whole record when it exists.
            if let Some(value) = self.get(&batch::chunk_key(record_key, 0, 1)).await? {
                return Ok(Some(value));
            }
            join_chunks(self.scan(keys::chunks_range(record_key), usize::MAX, false).await?)
        }
    }

    /// Up to `limit` (at least one) whole chunked records of `range` in key order (a run's
    /// history records, for example), ending before a record that would take the page's
    /// values past `bytes_max` (the first record always comes). Scans about as many keys as
    /// the page holds, however long the range: the way to read a long range a page at a time.
    fn scan_records(
        &self,
        range: KeyRange,
        limit: usize,
        bytes_max: usize,
    ) -> impl Future<Output = Result<RecordPage>> + Send {
        async move {
            let limit = limit.max(1);
            let mut page = RecordPage::default();
            let mut bytes = 0;
            let mut begin = range.begin;
            // Records are usually one key each; one more key says whether more follow.
            let mut window = limit.saturating_add(1);
            loop {
                let mut pairs = self.scan(KeyRange { begin, end: range.end.clone() }, window, false).await?;
                let exhausted = pairs.len() < window;
                let whole = if exhausted { pairs.len() } else { batch::whole_records_len(&pairs)? };
                // The window cut a record short: that record follows the whole ones.
                let cut = whole < pairs.len();
                if whole == 0 {
                    let Some((first, _)) = pairs.into_iter().next() else { return Ok(page) };
                    // One record has more chunks than the window held.
                    begin = first;
                    window = window.saturating_mul(2);
                    continue;
                }
                pairs.truncate(whole);
                // The smallest key after the last whole record's last chunk.
                begin = pairs[whole - 1].0.clone();
                begin.push(0);
                for (key, value) in join_records(pairs)? {
                    if page.records.len() == limit || (!page.records.is_empty() && bytes + value.len() > bytes_max) {
                        page.more = true;
                        return Ok(page);
                    }
                    bytes += value.len();
                    page.records.push((key, value));
                }
                if exhausted {
                    return Ok(page);
                }
                if page.records.len() == limit {
                    // The page is full and no record past it was seen: the window's one
                    // extra key may have been a chunk of the page's last record. A record
                    // follows when the window cut one, or when a key follows the page.
                    let rest = KeyRange { begin, end: range.end };
                    page.more = cut || !self.scan(rest, 1, false).await?.is_empty();
                    return Ok(page);
                }
                window = (limit - page.records.len()).saturating_add(1);
            }
        }
    }
}
