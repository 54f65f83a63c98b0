//! Write batches: the mutations of one transaction, checked against FoundationDB's limits
//! before any backend touches storage, and chunking for records larger than one value.
//!
//! Invariants:
//! - `bytes` is the transaction size FoundationDB's client charges for the mutations (its
//!   approximate size, which it refuses past 10,000,000 bytes): key and value, plus the
//!   write conflict range each mutation adds and a fixed cost for each mutation and range.
//!   A backend that prefixes every key adds its prefix per key written
//!   ([`WriteBatch::commit_bytes`]).
//! - Mutations apply in the order they were added; a later mutation wins over an earlier
//!   one on the same key (a `set_chunked` relies on this: it clears the record's old chunks
//!   and then writes the new ones).
//! - A chunked record lives under `record_key + pack(index) + pack(count)`: chunk keys sort
//!   by index, and every chunk names how many chunks the record has, so a reader can tell a
//!   complete record from a cut one.

use foundationdb_tuple::{pack, pack_into, unpack, Element};

use crate::{
    keys, printable_key, Error, Key, KeyRange, Result, StoreLimits, Value, FDB_TRANSACTION_BYTES_MAX,
    FDB_VALUE_BYTES_MAX,
};

/// One change to a shard's key space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Sets `key` to `value`, replacing any value.
    Set(Key, Value),
    /// Removes `key` if present.
    Clear(Key),
    /// Removes every key in the range.
    ClearRange(KeyRange),
}

/// The mutations of one transaction, in order, with their FoundationDB-charged size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    mutations: Vec<Mutation>,
    bytes: usize,
    /// How many times a key is charged in `bytes` (a set's key is charged three times: as
    /// the mutation's and as both bounds of its conflict range), so that a backend can add
    /// its key prefix as often.
    keys_charged: usize,
}

/// What FoundationDB's client charges for each mutation beyond its keys and value
/// (`sizeof(MutationRef)` on a 64-bit host).
const FDB_MUTATION_COST: usize = 40;
/// What it charges for each key range (a conflict range, a cleared key) beyond its
/// bounds (`sizeof(KeyRangeRef)`).
const FDB_RANGE_COST: usize = 32;

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        WriteBatch::default()
    }

    /// Sets `key` to `value`.
    pub fn set(&mut self, key: impl Into<Key>, value: impl Into<Value>) {
        let (key, value) = (key.into(), value.into());
        // The mutation, and the conflict range [key, key + \0).
        self.bytes += key.len() + value.len() + FDB_MUTATION_COST + FDB_RANGE_COST + 2 * key.len() + 1;
        self.keys_charged += 3;
        self.mutations.push(Mutation::Set(key, value));
    }

    /// Removes `key`.
    pub fn clear(&mut self, key: impl Into<Key>) {
        let key = key.into();
        // The key's range [key, key + \0), as the clear (a mutation where the cluster counts
        // it, a range where the client estimates it) and as its conflict range.
        self.bytes += FDB_MUTATION_COST + FDB_RANGE_COST + 2 * (2 * key.len() + 1);
        self.keys_charged += 4;
        self.mutations.push(Mutation::Clear(key));
    }

    /// Removes every key in `range`.
    pub fn clear_range(&mut self, range: KeyRange) {
        // The mutation, and the range again as its conflict range.
        let bounds = range.begin.len() + range.end.len();
        self.bytes += bounds + FDB_MUTATION_COST + FDB_RANGE_COST + bounds;
        self.keys_charged += 4;
        self.mutations.push(Mutation::ClearRange(range));
    }

    /// Writes `value` as a chunked record under `record_key` (for example
    /// [`keys::snapshot`] or [`keys::history`]): first clears every chunk the record had,
    /// then writes chunks of at most `limits.value_bytes_max` bytes. A value that fits in
    /// one chunk is still written as one chunk, so readers have one path. Returns the
    /// number of chunks. Read the record back with [`crate::ShardStore::get_chunked`], or
    /// with [`join_chunks`] over a scan of [`keys::chunks_range`]`(record_key)`.
    ///
    /// ```
    /// use flowgrid_store::{keys, join_chunks, Mutation, StoreLimits, WriteBatch};
    ///
    /// let limits = StoreLimits { value_bytes_max: 4, ..StoreLimits::default() };
    /// let record_key = keys::snapshot(&flowgrid_model::RunId("r1".into()));
    /// let mut batch = WriteBatch::new();
    /// assert_eq!(batch.set_chunked(&record_key, b"0123456789", &limits), 3);
    /// let stored: Vec<_> = batch
    ///     .mutations()
    ///     .iter()
    ///     .filter_map(|m| match m {
    ///         Mutation::Set(k, v) => Some((k.clone(), v.clone())),
    ///         _ => None,
    ///     })
    ///     .collect();
    /// assert_eq!(join_chunks(stored).unwrap(), Some(b"0123456789".to_vec()));
    /// ```
    pub fn set_chunked(&mut self, record_key: &[u8], value: &[u8], limits: &StoreLimits) -> usize {
        self.clear_range(keys::chunks_range(record_key));
        self.insert_chunked(record_key, value, limits)
    }

    /// Like [`WriteBatch::set_chunked`], for a record key that was never written: a
    /// history record (its sequence number is new) or the snapshot of a run that is
    /// ending. It skips the clear of earlier chunks, a range clear that costs every
    /// backend a range operation. Writing a key that does exist this way can leave chunks
    /// of both versions, which readers reject as a broken record.
    pub fn insert_chunked(&mut self, record_key: &[u8], value: &[u8], limits: &StoreLimits) -> usize {
        assert!(limits.value_bytes_max > 0, "value_bytes_max must be positive to chunk a record");
        let count = value.len().div_ceil(limits.value_bytes_max).max(1);
        let count_u32 = u32::try_from(count).expect("a record over 4 billion chunks is over every transaction limit");
        for index in 0..count_u32 {
            let start = index as usize * limits.value_bytes_max;
            let end = (start + limits.value_bytes_max).min(value.len());
            self.set(chunk_key(record_key, index, count_u32), &value[start..end]);
        }
        count
    }

    /// True when the batch holds no mutation.
    pub fn is_empty(&self) -> bool {
        self.mutations.is_empty()
    }

    /// Number of mutations.
    pub fn len(&self) -> usize {
        self.mutations.len()
    }

    /// Transaction size as FoundationDB charges it (see the module docs).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Transaction size as FoundationDB charges it when a backend writes every key behind a
    /// prefix of `key_prefix_bytes`.
    fn bytes_with_key_prefix(&self, key_prefix_bytes: usize) -> usize {
        self.bytes.saturating_add(self.keys_charged.saturating_mul(key_prefix_bytes))
    }

    /// What FoundationDB charges the commit of this batch behind a key prefix of
    /// `key_prefix_bytes`: the batch, and the read conflict range of the epoch key the
    /// commit reads to fence an earlier owner.
    pub fn commit_bytes(&self, key_prefix_bytes: usize) -> usize {
        let epoch_key = key_prefix_bytes + keys::epoch().len();
        self.bytes_with_key_prefix(key_prefix_bytes).saturating_add(FDB_RANGE_COST + 2 * epoch_key + 1)
    }

    /// The mutations, in the order they apply.
    pub fn mutations(&self) -> &[Mutation] {
        &self.mutations
    }

    /// Takes the mutations out, in the order they apply.
    pub fn into_mutations(self) -> Vec<Mutation> {
        self.mutations
    }

    /// Checks every key, value and the whole transaction against `limits`, every value and
    /// the transaction also against FoundationDB's own limits (whatever `limits` allow, a
    /// cluster refuses more at every retry), and that no mutation touches the shard's epoch
    /// key. Backends call this before they start a transaction, so a batch that fails
    /// writes nothing.
    pub fn check(&self, limits: &StoreLimits) -> Result<()> {
        if self.bytes > limits.transaction_bytes_max {
            return Err(Error::TooLarge { what: "transaction", size: self.bytes, limit: limits.transaction_bytes_max });
        }
        let commit_bytes = self.commit_bytes(limits.key_prefix_bytes_max);
        if commit_bytes > FDB_TRANSACTION_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "transaction with a key prefix on every key",
                size: commit_bytes,
                limit: FDB_TRANSACTION_BYTES_MAX,
            });
        }
        let epoch_key = keys::epoch();
        for mutation in &self.mutations {
            match mutation {
                Mutation::Set(key, value) => {
                    check_key(key, &epoch_key, limits)?;
                    if value.len() > limits.value_bytes_max {
                        return Err(Error::TooLarge {
                            what: "value",
                            size: value.len(),
                            limit: limits.value_bytes_max,
                        });
                    }
                    if value.len() > FDB_VALUE_BYTES_MAX {
                        return Err(Error::TooLarge {
                            what: "value (value_bytes_max is over FoundationDB's value limit: lower it)",
                            size: value.len(),
                            limit: FDB_VALUE_BYTES_MAX,
                        });
                    }
                }
                Mutation::Clear(key) => check_key(key, &epoch_key, limits)?,
                Mutation::ClearRange(range) => {
                    // FoundationDB allows a range end one byte longer than a key (`key + \xff`).
                    for bound in [&range.begin, &range.end] {
                        if bound.len() > limits.key_bytes_max + 1 {
                            return Err(Error::TooLarge {
                                what: "key",
                                size: bound.len(),
                                limit: limits.key_bytes_max,
                            });
                        }
                    }
                    if range.contains(&epoch_key) {
                        return Err(Error::ReservedKey { key: printable_key(&epoch_key) });
                    }
                }
            }
        }
        Ok(())
    }
}

fn check_key(key: &[u8], epoch_key: &[u8], limits: &StoreLimits) -> Result<()> {
    if key.len() > limits.key_bytes_max {
        return Err(Error::TooLarge { what: "key", size: key.len(), limit: limits.key_bytes_max });
    }
    if key == epoch_key {
        return Err(Error::ReservedKey { key: printable_key(key) });
    }
    Ok(())
}

/// The key of chunk `index` of `count` of the record at `record_key`.
pub(crate) fn chunk_key(record_key: &[u8], index: u32, count: u32) -> Key {
    // What `Subspace::from_bytes(record_key).pack(&(index, count))` gives, in one
    // allocation: two packed integers take at most 10 bytes.
    let mut key = Vec::with_capacity(record_key.len() + 10);
    key.extend_from_slice(record_key);
    pack_into(&(index, count), &mut key);
    key
}

/// The `(index, count)` of the chunk whose key is `key`: for a backend that reads chunked
/// records itself.
pub fn chunk_position(key: &[u8]) -> Result<(u64, u64)> {
    decode_chunk_key(key).map(|chunk| (chunk.index, chunk.count))
}

/// One decoded chunk key.
struct Chunk {
    record_key: Key,
    index: u64,
    count: u64,
}

fn decode_chunk_key(key: &[u8]) -> Result<Chunk> {
    let malformed = |source| Error::MalformedKey { kind: "chunk", key: printable_key(key), source };
    let mut elements: Vec<Element<'_>> = unpack(key).map_err(malformed)?;
    let not_a_chunk = |detail: &str| Error::Corrupt { key: printable_key(key), detail: detail.to_string() };
    if elements.len() < 3 {
        return Err(not_a_chunk("a chunk key ends with (index, count) after the record key"));
    }
    let count_element = elements.pop().expect("length checked");
    let index_element = elements.pop().expect("length checked");
    let (Some(index), Some(count)) = (index_element.as_i64(), count_element.as_i64()) else {
        return Err(not_a_chunk("the chunk index and count are not integers"));
    };
    let (Ok(index), Ok(count)) = (u64::try_from(index), u64::try_from(count)) else {
        return Err(not_a_chunk("the chunk index or count is negative"));
    };
    if index >= count {
        return Err(not_a_chunk("the chunk index is not below the chunk count"));
    }
    let suffix_len = pack(&(index_element, count_element)).len();
    Ok(Chunk { record_key: key[..key.len() - suffix_len].to_vec(), index, count })
}

/// How many of `pairs`, scanned forward through chunked records, form whole records: all
/// of them unless the last record's last chunk is missing (a scan limit cut it), then the
/// pairs before that record's first chunk.
pub(crate) fn whole_records_len(pairs: &[(Key, Value)]) -> Result<usize> {
    let Some((last_key, _)) = pairs.last() else { return Ok(0) };
    let last = decode_chunk_key(last_key)?;
    if last.index + 1 == last.count {
        return Ok(pairs.len());
    }
    // Tuple encoding is prefix-free: only this record's chunk keys start with its key.
    Ok(pairs.iter().rposition(|(key, _)| !key.starts_with(&last.record_key)).map_or(0, |before| before + 1))
}

/// Joins the chunks of one record, as scanned from [`keys::chunks_range`] (in either
/// order). `Ok(None)` when there are no chunks (the record does not exist); an error names
/// the key when chunks are missing, belong to different records or are malformed (which
/// also happens when a scan limit cut the record short: scan a record's range unlimited).
pub fn join_chunks(pairs: Vec<(Key, Value)>) -> Result<Option<Value>> {
    let mut records = join_records(pairs)?;
    match records.len() {
        0 => Ok(None),
        1 => Ok(records.pop().map(|(_, value)| value)),
        _ => Err(Error::Corrupt {
            key: printable_key(&records[1].0),
            detail: format!("expected the chunks of one record, found {} records", records.len()),
        }),
    }
}

/// Joins the chunks of many records scanned in one range (for example every event of
/// [`keys::history_range`]) into `(record key, value)` pairs, in the order of the scan
/// (forward or reverse). Every record must be complete: scan the range without a limit, or
/// treat an error at the end of a limited scan as "scan further".
pub fn join_records(pairs: Vec<(Key, Value)>) -> Result<Vec<(Key, Value)>> {
    let mut records = Vec::new();
    let mut current: Option<(Chunk, Vec<Option<Value>>)> = None;
    for (key, value) in pairs {
        let chunk = decode_chunk_key(&key)?;
        let same_record = current.as_ref().is_some_and(|(first, _)| first.record_key == chunk.record_key);
        if !same_record {
            if let Some(done) = current.take() {
                records.push(finish_record(done)?);
            }
            let slots = usize::try_from(chunk.count).map_err(|_| Error::Corrupt {
                key: printable_key(&key),
                detail: format!("chunk count {} does not fit in memory", chunk.count),
            })?;
            current =
                Some((Chunk { record_key: chunk.record_key.clone(), index: 0, count: chunk.count }, vec![None; slots]));
        }
        let (first, slots) = current.as_mut().expect("set above");
        if chunk.count != first.count {
            return Err(Error::Corrupt {
                key: printable_key(&key),
                detail: format!(
                    "chunk says the record has {} chunks, an earlier chunk said {}",
                    chunk.count, first.count
                ),
            });
        }
        slots[chunk.index as usize] = Some(value);
    }
    if let Some(done) = current.take() {
        records.push(finish_record(done)?);
    }
    Ok(records)
}

fn finish_record((first, slots): (Chunk, Vec<Option<Value>>)) -> Result<(Key, Value)> {
    let present = slots.iter().filter(|slot| slot.is_some()).count();
    if present != slots.len() {
        return Err(Error::Corrupt {
            key: printable_key(&first.record_key),
            detail: format!(
                "the record has {present} of its {} chunks (a scan limit cut it, or chunks were lost)",
                slots.len()
            ),
        });
    }
    let mut value = Vec::with_capacity(slots.iter().flatten().map(Vec::len).sum());
    for chunk in slots.into_iter().flatten() {
        value.extend_from_slice(&chunk);
    }
    Ok((first.record_key, value))
}

#[cfg(test)]
mod tests {
    use flowgrid_model::RunId;

    use super::*;

    #[test]
    fn chunk_keys_are_the_record_key_extended_by_index_and_count() {
        let record_key = keys::history(&RunId("run-1".into()), 7);
        for (index, count) in [(0, 1), (3, 200), (u32::MAX - 1, u32::MAX)] {
            let expected = foundationdb_tuple::Subspace::from_bytes(record_key.as_slice()).pack(&(index, count));
            assert_eq!(chunk_key(&record_key, index, count), expected, "chunk {index} of {count}");
        }
    }

    fn sets(batch: &WriteBatch) -> Vec<(Key, Value)> {
        batch
            .mutations()
            .iter()
            .filter_map(|mutation| match mutation {
                Mutation::Set(key, value) => Some((key.clone(), value.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn bytes_count_what_foundationdb_charges() {
        let mut batch = WriteBatch::new();
        // Key and value, the mutation, the conflict range and its bounds ("ab", "ab\0").
        batch.set(b"ab".to_vec(), b"xyz".to_vec());
        assert_eq!(batch.bytes(), 5 + 40 + 32 + 5);
        // The key's range ("k", "k\0") twice: the clear and its conflict range.
        batch.clear(b"k".to_vec());
        assert_eq!(batch.bytes(), 82 + 40 + 32 + 2 * 3);
        // The bounds twice, the mutation and the conflict range.
        batch.clear_range(KeyRange { begin: b"a".to_vec(), end: b"b".to_vec() });
        assert_eq!(batch.bytes(), 160 + 2 + 40 + 32 + 2);
        assert_eq!(batch.len(), 3);
        assert!(!batch.is_empty());
        // A prefix of 10 bytes on every key: three keys for the set, four for each clear.
        assert_eq!(batch.bytes_with_key_prefix(10), batch.bytes() + (3 + 4 + 4) * 10);
        // Many small keys: what the keys and values alone would count is a fraction of it.
        let mut small = WriteBatch::new();
        for index in 0u32..1_000 {
            small.set(index.to_be_bytes().to_vec(), b"v".to_vec());
        }
        assert_eq!(small.bytes(), 1_000 * (5 + 40 + 32 + 9));
    }

    #[test]
    fn check_names_the_limit_that_failed() {
        let limits =
            StoreLimits { key_bytes_max: 4, value_bytes_max: 4, transaction_bytes_max: 255, ..StoreLimits::default() };
        let mut batch = WriteBatch::new();
        batch.set(b"kkkk".to_vec(), b"vvvv".to_vec());
        assert!(batch.check(&limits).is_ok());
        let mut long_key = batch.clone();
        long_key.set(b"kkkkk".to_vec(), Vec::new());
        assert!(matches!(long_key.check(&limits), Err(Error::TooLarge { what: "key", size: 5, limit: 4 })));
        let mut long_value = batch.clone();
        long_value.set(b"k".to_vec(), b"vvvvv".to_vec());
        assert!(matches!(long_value.check(&limits), Err(Error::TooLarge { what: "value", size: 5, limit: 4 })));
        let mut big = batch.clone();
        big.set(b"k2".to_vec(), b"vvvv".to_vec());
        big.set(b"k3".to_vec(), b"vvvv".to_vec());
        assert!(big.check(&limits).is_ok(), "exactly at the transaction limit passes");
        big.clear(b"k".to_vec());
        assert!(matches!(big.check(&limits), Err(Error::TooLarge { what: "transaction", size: 333, limit: 255 })));
    }

    #[test]
    fn check_counts_a_key_prefix_on_every_key() {
        // Many small keys within the transaction bound, but not with a prefix on each.
        let mut batch = WriteBatch::new();
        for index in 0u32..79_000 {
            batch.set(keys::run(&flowgrid_model::RunId(format!("r{index}").into())), b"v".to_vec());
        }
        let limits = StoreLimits::default();
        assert!(batch.bytes() <= limits.transaction_bytes_max, "{}", batch.bytes());
        let with_prefix = batch.commit_bytes(limits.key_prefix_bytes_max);
        match batch.check(&limits) {
            Err(Error::TooLarge { size, limit: 10_000_000, .. }) => assert_eq!(size, with_prefix),
            other => panic!("expected TooLarge with the prefix counted, got {other:?}"),
        }
        let epoch_range = 32 + 2 * (64 + keys::epoch().len()) + 1;
        assert_eq!(with_prefix, batch.bytes() + 3 * 79_000 * 64 + epoch_range);
        assert!(batch.check(&StoreLimits { key_prefix_bytes_max: 0, ..limits }).is_ok());
    }

    #[test]
    fn check_refuses_a_value_over_foundationdbs_limit_whatever_value_bytes_max_allows() {
        let limits = StoreLimits { value_bytes_max: 2 * FDB_VALUE_BYTES_MAX, ..StoreLimits::default() };
        let mut at_limit = WriteBatch::new();
        at_limit.set(b"k".to_vec(), vec![0u8; FDB_VALUE_BYTES_MAX]);
        assert!(at_limit.check(&limits).is_ok(), "a value of exactly FoundationDB's limit passes");
        let mut over = WriteBatch::new();
        over.set(b"k".to_vec(), vec![0u8; FDB_VALUE_BYTES_MAX + 1]);
        match over.check(&limits) {
            Err(error @ Error::TooLarge { size, limit: FDB_VALUE_BYTES_MAX, .. }) => {
                assert_eq!(size, FDB_VALUE_BYTES_MAX + 1);
                assert!(error.to_string().contains("lower it"), "the error says what to fix: {error}");
                assert!(error.to_string().contains("value_bytes_max"), "the error names the setting: {error}");
            }
            other => panic!("a value over FoundationDB's limit must fail with TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn check_refuses_writes_to_the_epoch_key() {
        let limits = StoreLimits::default();
        let mut set = WriteBatch::new();
        set.set(keys::epoch(), 7u64.to_be_bytes().to_vec());
        assert!(matches!(set.check(&limits), Err(Error::ReservedKey { .. })));
        let mut clear_all = WriteBatch::new();
        clear_all.clear_range(KeyRange { begin: Vec::new(), end: vec![0xFF] });
        assert!(matches!(clear_all.check(&limits), Err(Error::ReservedKey { .. })));
    }

    #[test]
    fn chunked_record_round_trips_in_order() {
        let limits = StoreLimits { value_bytes_max: 1000, ..StoreLimits::default() };
        let value: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let record_key = keys::snapshot(&RunId("run-1".into()));
        let mut batch = WriteBatch::new();
        assert_eq!(batch.set_chunked(&record_key, &value, &limits), 300);
        assert!(matches!(batch.mutations()[0], Mutation::ClearRange(_)));
        let mut pairs = sets(&batch);
        assert!(pairs.iter().all(|(key, _)| keys::chunks_range(&record_key).contains(key)));
        let mut sorted = pairs.clone();
        sorted.sort();
        assert_eq!(sorted, pairs, "chunk keys sort by chunk index");
        assert_eq!(join_chunks(pairs.clone()).unwrap(), Some(value.clone()));
        pairs.reverse();
        assert_eq!(join_chunks(pairs.clone()).unwrap(), Some(value));
        pairs.remove(7);
        assert!(matches!(join_chunks(pairs), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn insert_chunked_writes_the_same_chunks_without_the_clear() {
        let limits = StoreLimits { value_bytes_max: 4, ..StoreLimits::default() };
        let record_key = keys::history(&RunId("run-1".into()), 3);
        let (mut set, mut insert) = (WriteBatch::new(), WriteBatch::new());
        assert_eq!(set.set_chunked(&record_key, b"0123456789", &limits), 3);
        assert_eq!(insert.insert_chunked(&record_key, b"0123456789", &limits), 3);
        assert!(insert.mutations().iter().all(|mutation| matches!(mutation, Mutation::Set(..))));
        assert_eq!(sets(&insert), sets(&set));
        assert_eq!(join_chunks(sets(&insert)).unwrap(), Some(b"0123456789".to_vec()));
    }

    #[test]
    fn empty_and_small_values_are_one_chunk() {
        let limits = StoreLimits::default();
        let record_key = keys::snapshot(&RunId("run-1".into()));
        let mut batch = WriteBatch::new();
        assert_eq!(batch.set_chunked(&record_key, b"", &limits), 1);
        assert_eq!(join_chunks(sets(&batch)).unwrap(), Some(Vec::new()));
        assert_eq!(join_chunks(Vec::new()).unwrap(), None);
    }

    #[test]
    fn join_records_splits_records_and_keeps_scan_order() {
        let limits = StoreLimits { value_bytes_max: 3, ..StoreLimits::default() };
        let run = RunId("run-1".into());
        let mut batch = WriteBatch::new();
        batch.set_chunked(&keys::history(&run, 1), b"first event", &limits);
        batch.set_chunked(&keys::history(&run, 2), b"second", &limits);
        let pairs = sets(&batch);
        let records = join_records(pairs.clone()).unwrap();
        assert_eq!(
            records,
            vec![(keys::history(&run, 1), b"first event".to_vec()), (keys::history(&run, 2), b"second".to_vec())]
        );
        let reversed: Vec<_> = pairs.into_iter().rev().collect();
        let records = join_records(reversed).unwrap();
        assert_eq!(records[0].0, keys::history(&run, 2));
        assert!(matches!(join_chunks(sets(&batch)), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn cut_record_is_an_error_naming_the_record() {
        let limits = StoreLimits { value_bytes_max: 2, ..StoreLimits::default() };
        let record_key = keys::snapshot(&RunId("run-9".into()));
        let mut batch = WriteBatch::new();
        batch.set_chunked(&record_key, b"abcdef", &limits);
        let mut pairs = sets(&batch);
        pairs.pop();
        let error = join_chunks(pairs).unwrap_err();
        assert!(error.to_string().contains("run-9"), "{error}");
        assert!(error.to_string().contains("2 of its 3 chunks"), "{error}");
    }

    #[test]
    fn non_chunk_keys_are_rejected() {
        let error = join_chunks(vec![(b"\xffgarbage".to_vec(), Vec::new())]).unwrap_err();
        assert!(matches!(error, Error::MalformedKey { kind: "chunk", .. }), "{error}");
        let error = join_chunks(vec![(keys::run(&RunId("r".into())), Vec::new())]).unwrap_err();
        assert!(matches!(error, Error::Corrupt { .. }), "{error}");
    }
}
