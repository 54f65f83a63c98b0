//! The key layout of one shard's key space, in FoundationDB tuple encoding.
//!
//! | kind | key | value |
//! |------|-----|-------|
//! | epoch | `("meta", "epoch")` | u64 big-endian ([`encode_epoch`]) |
//! | catalog | `("catalog", flow, version)` | flow definition (flows whose name hashes to this shard) |
//! | pinned definition | `("def", flow, version)` | the definition a run of this shard uses |
//! | run | `("run", run_id)` | run record, written when the run ends |
//! | active | `("active", run_id)` | index of runs not yet ended |
//! | history | `("hist", run_id, seq)` + chunk | events, chunked |
//! | created | `("created", created_ms, run_id)` | listing index of ended runs, newest last |
//! | snapshot | `("snap", run_id)` + chunk | final view of an ended run, chunked |
//! | outbox | `("outbox", run_id, what)` + chunk | a message about a run for another shard, until taken |
//!
//! Invariants:
//! - Every key is a packed tuple whose first element names its kind, so the kinds never
//!   overlap and each kind's range ([`catalog_range`], [`active_range`], ...) holds only
//!   keys of that kind.
//! - Tuple encoding preserves order: integers sort numerically (history by `seq`, the
//!   created index by time), strings lexicographically, and a tuple sorts before every
//!   tuple it is a prefix of.
//! - Chunked kinds (history, snapshot) are record keys: the stored keys are the record key
//!   followed by the chunk index and count (see [`crate::WriteBatch::set_chunked`]); scan
//!   [`chunks_range`] and join with [`crate::join_chunks`] / [`crate::join_records`].
//! - A running run is its history and its `active` entry; its run record and listing
//!   entry are written when it ends. Stores written before that rule (ADR 0009) also
//!   hold them for running runs, and readers accept both.
//! - The layout is persisted: changing an element or its type is a data migration.

use flowgrid_model::{Epoch, RunId};
use foundationdb_tuple::{pack, pack_into, unpack, Element, PackError, Subspace, TuplePack, TupleUnpack};

use crate::{printable_key, Error, KeyRange, Result};

/// The shard's epoch: `("meta", "epoch")`. Only `acquire` writes it.
pub fn epoch() -> Vec<u8> {
    pack(&("meta", "epoch"))
}

/// The stored form of an epoch: 8 bytes, big-endian.
pub fn encode_epoch(epoch: Epoch) -> Vec<u8> {
    epoch.0.to_be_bytes().to_vec()
}

/// Decodes the value of [`epoch`]; a missing value is epoch 0 (never acquired).
pub fn decode_epoch(value: Option<&[u8]>) -> Result<Epoch> {
    let Some(value) = value else { return Ok(Epoch(0)) };
    let bytes: [u8; 8] = value.try_into().map_err(|_| Error::Corrupt {
        key: printable_key(&epoch()),
        detail: format!("the epoch value is {} bytes; it must be an 8-byte big-endian integer", value.len()),
    })?;
    Ok(Epoch(u64::from_be_bytes(bytes)))
}

/// A flow definition in the catalog: `("catalog", flow, version)`.
pub fn catalog(flow: &str, version: u32) -> Vec<u8> {
    packed(&("catalog", flow, version))
}

/// Every version of `flow` in the catalog, oldest first.
pub fn catalog_flow_range(flow: &str) -> KeyRange {
    tuple_range(&("catalog", flow))
}

/// The whole catalog, by flow name then version.
pub fn catalog_range() -> KeyRange {
    tuple_range(&("catalog",))
}

/// Decodes a [`catalog`] key into `(flow, version)`.
pub fn decode_catalog(key: &[u8]) -> Result<(String, u32)> {
    let (_, flow, version): (String, String, u32) = decode("catalog", "catalog", key)?;
    Ok((flow, version))
}

/// A flow whose automatic starts (schedule, trigger) are paused: `("flow_paused", flow)`.
pub fn flow_paused(flow: &str) -> Vec<u8> {
    packed(&("flow_paused", flow))
}

/// Every paused flow of the shard's catalog.
pub fn flow_paused_range() -> KeyRange {
    tuple_range(&("flow_paused",))
}

/// Decodes a [`flow_paused`] key into the flow's name.
pub fn decode_flow_paused(key: &[u8]) -> Result<String> {
    let (_, flow): (String, String) = decode("flow_paused", "flow_paused", key)?;
    Ok(flow)
}

/// When a paused flow was last resumed: `("flow_resumed", flow)`. A shard that reloads
/// soon after looks for missed slots from then on, not in the pause.
pub fn flow_resumed(flow: &str) -> Vec<u8> {
    packed(&("flow_resumed", flow))
}

/// Every resume time of the shard's catalog.
pub fn flow_resumed_range() -> KeyRange {
    tuple_range(&("flow_resumed",))
}

/// Decodes a [`flow_resumed`] key into the flow's name.
pub fn decode_flow_resumed(key: &[u8]) -> Result<String> {
    let (_, flow): (String, String) = decode("flow_resumed", "flow_resumed", key)?;
    Ok(flow)
}

/// The copy of a definition that runs of this shard use: `("def", flow, version)`.
pub fn pinned_definition(flow: &str, version: u32) -> Vec<u8> {
    packed(&("def", flow, version))
}

/// A run record: `("run", run_id)`.
pub fn run(run_id: &RunId) -> Vec<u8> {
    packed(&("run", run_id.as_str()))
}

/// Every run record, by run id.
pub fn run_range() -> KeyRange {
    tuple_range(&("run",))
}

/// Decodes a [`run`] key into its run id.
pub fn decode_run(key: &[u8]) -> Result<RunId> {
    let (_, run_id): (String, String) = decode("run", "run", key)?;
    Ok(RunId(run_id.into()))
}

/// A run that has not ended yet: `("active", run_id)`.
pub fn active(run_id: &RunId) -> Vec<u8> {
    packed(&("active", run_id.as_str()))
}

/// Every active run, by run id.
pub fn active_range() -> KeyRange {
    tuple_range(&("active",))
}

/// Decodes an [`active`] key into its run id.
pub fn decode_active(key: &[u8]) -> Result<RunId> {
    let (_, run_id): (String, String) = decode("active", "active", key)?;
    Ok(RunId(run_id.into()))
}

/// The record key of event `seq` of a run: `("hist", run_id, seq)`. Chunked.
pub fn history(run_id: &RunId, seq: u64) -> Vec<u8> {
    packed(&("hist", run_id.as_str(), seq))
}

/// Every event chunk of a run, in `seq` order.
pub fn history_range(run_id: &RunId) -> KeyRange {
    tuple_range(&("hist", run_id.as_str()))
}

/// Every event chunk of every run of the shard, by run id then `seq` (for audits).
pub fn history_all_range() -> KeyRange {
    tuple_range(&("hist",))
}

/// Decodes a [`history`] record key (as returned by [`crate::join_records`]) into
/// `(run_id, seq)`.
pub fn decode_history(key: &[u8]) -> Result<(RunId, u64)> {
    let (_, run_id, seq): (String, String, u64) = decode("hist", "history", key)?;
    Ok((RunId(run_id.into()), seq))
}

/// The listing index: `("created", created_ms, run_id)`, newest last.
pub fn created(created_ms: u64, run_id: &RunId) -> Vec<u8> {
    packed(&("created", created_ms, run_id.as_str()))
}

/// The whole listing index, oldest first (scan in reverse for newest first).
pub fn created_range() -> KeyRange {
    tuple_range(&("created",))
}

/// The part of the listing index of runs created at or after `since_ms` and before
/// `until_ms` (either bound may be open).
pub fn created_between(since_ms: Option<u64>, until_ms: Option<u64>) -> KeyRange {
    let whole = created_range();
    // A run's key extends the packed `("created", ms)`, so that prefix sorts before every
    // run of that millisecond and after every run of an earlier one.
    KeyRange {
        begin: since_ms.map_or(whole.begin, |since_ms| packed(&("created", since_ms))),
        end: until_ms.map_or(whole.end, |until_ms| packed(&("created", until_ms))),
    }
}

/// Decodes a [`created`] key into `(created_ms, run_id)`.
pub fn decode_created(key: &[u8]) -> Result<(u64, RunId)> {
    let (_, created_ms, run_id): (String, u64, String) = decode("created", "created", key)?;
    Ok((created_ms, RunId(run_id.into())))
}

/// The record key of the final view of an ended run: `("snap", run_id)`. Chunked.
pub fn snapshot(run_id: &RunId) -> Vec<u8> {
    packed(&("snap", run_id.as_str()))
}

/// Every chunk of every snapshot of the shard, by run id (for audits).
pub fn snapshot_range() -> KeyRange {
    tuple_range(&("snap",))
}

/// Decodes a [`snapshot`] record key (as returned by [`crate::join_records`]) into its run id.
pub fn decode_snapshot(key: &[u8]) -> Result<RunId> {
    let (_, run_id): (String, String) = decode("snap", "snapshot", key)?;
    Ok(RunId(run_id.into()))
}

/// The record key of message `what` about run `run_id` in the shard's outbox:
/// `("outbox", run_id, what)`. Chunked.
pub fn outbox(run_id: &RunId, what: &str) -> Vec<u8> {
    packed(&("outbox", run_id.as_str(), what))
}

/// Every chunk of every message in the shard's outbox.
pub fn outbox_range() -> KeyRange {
    tuple_range(&("outbox",))
}

/// Decodes an [`outbox`] record key into `(run_id, what)`.
pub fn decode_outbox(key: &[u8]) -> Result<(RunId, String)> {
    let (_, run_id, what): (String, String, String) = decode("outbox", "outbox", key)?;
    Ok((RunId(run_id.into()), what))
}

/// A run's place under a concurrency limit this shard keeps: `("gate", flow, key, run_id)`.
pub fn gate(flow: &str, key: &str, run_id: &RunId) -> Vec<u8> {
    packed(&("gate", flow, key, run_id.as_str()))
}

/// Every place under every concurrency limit the shard keeps.
pub fn gate_range() -> KeyRange {
    tuple_range(&("gate",))
}

/// Decodes a [`gate`] key into `(flow, key, run_id)`.
pub fn decode_gate(key: &[u8]) -> Result<(String, String, RunId)> {
    let (_, flow, gate_key, run_id): (String, String, String, String) = decode("gate", "gate", key)?;
    Ok((flow, gate_key, RunId(run_id.into())))
}

/// The state of a concurrency limit's start rate this shard keeps: `("gate_rate", flow, key)`.
pub fn gate_rate(flow: &str, key: &str) -> Vec<u8> {
    packed(&("gate_rate", flow, key))
}

/// The states of every start rate the shard keeps.
pub fn gate_rate_range() -> KeyRange {
    tuple_range(&("gate_rate",))
}

/// Decodes a [`gate_rate`] key into `(flow, key)`.
pub fn decode_gate_rate(key: &[u8]) -> Result<(String, String)> {
    let (_, flow, gate_key): (String, String, String) = decode("gate_rate", "gate rate", key)?;
    Ok((flow, gate_key))
}

/// Room for a typical key: a kind name, a run id and an integer or two.
const KEY_BYTES_HINT: usize = 80;

/// `pack(tuple)` into a buffer sized once: keys are built several times per transition,
/// and packing into an empty one grows it step by step.
fn packed<T: TuplePack>(tuple: &T) -> Vec<u8> {
    let mut key = Vec::with_capacity(KEY_BYTES_HINT);
    pack_into(tuple, &mut key);
    key
}

/// Every chunk of the chunked record at `record_key` (and nothing else).
pub fn chunks_range(record_key: &[u8]) -> KeyRange {
    let (begin, end) = Subspace::from_bytes(record_key).range();
    KeyRange { begin, end }
}

/// Every key that extends the packed `prefix` tuple by at least one element.
fn tuple_range<T: foundationdb_tuple::TuplePack>(prefix: &T) -> KeyRange {
    chunks_range(&pack(prefix))
}

/// Unpacks `key` as `T` after checking that its first element is the kind name `tag`.
fn decode<'de, T>(tag: &str, kind: &'static str, key: &'de [u8]) -> Result<T>
where
    T: TupleUnpack<'de>,
{
    let malformed = |source| Error::MalformedKey { kind, key: printable_key(key), source };
    let elements: Vec<Element<'_>> = unpack(key).map_err(malformed)?;
    match elements.first().and_then(|element| element.as_str()) {
        Some(found) if found == tag => unpack(key).map_err(malformed),
        Some(found) => {
            Err(malformed(PackError::Message(format!("the key starts with {found:?}, not {tag:?}").into_boxed_str())))
        }
        None => Err(malformed(PackError::Message(format!("the key does not start with {tag:?}").into_boxed_str()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_id(text: &str) -> RunId {
        RunId(text.into())
    }

    #[test]
    fn scanned_kinds_round_trip() {
        assert_eq!(decode_catalog(&catalog("orders", 7)).unwrap(), ("orders".to_string(), 7));
        assert_eq!(decode_active(&active(&run_id("r1"))).unwrap(), run_id("r1"));
        assert_eq!(decode_run(&run(&run_id("r1"))).unwrap(), run_id("r1"));
        assert_eq!(decode_snapshot(&snapshot(&run_id("r1"))).unwrap(), run_id("r1"));
        assert_eq!(decode_history(&history(&run_id("r1"), 42)).unwrap(), (run_id("r1"), 42));
        assert_eq!(
            decode_created(&created(1_700_000_000_000, &run_id("r1"))).unwrap(),
            (1_700_000_000_000, run_id("r1"))
        );
        assert_eq!(
            decode_gate(&gate("f", "acme", &run_id("r1"))).unwrap(),
            ("f".to_owned(), "acme".to_owned(), run_id("r1"))
        );
        assert!(gate_range().contains(&gate("f", "", &run_id("r1"))) && !gate_range().contains(&epoch()));
        assert_eq!(decode_gate_rate(&gate_rate("f", "acme")).unwrap(), ("f".to_owned(), "acme".to_owned()));
        assert!(gate_rate_range().contains(&gate_rate("f", "")) && !gate_range().contains(&gate_rate("f", "")));
        assert!(!gate_rate_range().contains(&gate("f", "", &run_id("r1"))));
    }

    #[test]
    fn a_window_of_the_listing_index_holds_the_runs_created_in_it() {
        let at = |ms: u64, id: &str| created(ms, &run_id(id));
        let window = created_between(Some(1_000), Some(2_000));
        assert!(!window.contains(&at(999, "zz")), "before the window");
        assert!(window.contains(&at(1_000, "")) && window.contains(&at(1_000, "zz")), "its first millisecond");
        assert!(window.contains(&at(1_999, "zz")), "its last millisecond");
        assert!(!window.contains(&at(2_000, "")), "its end is open");
        // Packed integers grow in length with their value; the order holds across lengths.
        assert!(created_between(Some(255), None).contains(&at(256, "a")));
        assert!(!created_between(None, Some(256)).contains(&at(65_536, "a")));
        let open = created_between(None, None);
        assert_eq!((open.begin, open.end), (created_range().begin, created_range().end));
        assert!(!created_between(Some(0), None).contains(&snapshot(&run_id("r1"))), "other kinds stay out");
    }

    #[test]
    fn each_kind_lies_in_its_own_range_only() {
        let id = run_id("r1");
        let all = [
            epoch(),
            catalog("f", 1),
            pinned_definition("f", 1),
            run(&id),
            active(&id),
            history(&id, 1),
            created(5, &id),
            snapshot(&id),
        ];
        let ranges = [
            catalog_range(),
            run_range(),
            active_range(),
            history_range(&id),
            history_all_range(),
            created_range(),
            snapshot_range(),
        ];
        let owners = [1, 3, 4, 5, 5, 6, 7];
        for (range, owner) in ranges.iter().zip(owners) {
            for (index, key) in all.iter().enumerate() {
                assert_eq!(range.contains(key), index == owner, "key {index} in range of key {owner}");
            }
        }
    }

    #[test]
    fn integers_sort_numerically() {
        let id = run_id("r1");
        assert!(history(&id, 9) < history(&id, 10));
        assert!(history(&id, 255) < history(&id, 256));
        assert!(created(999, &run_id("z")) < created(1_000, &run_id("a")));
        assert!(catalog("f", 2) < catalog("f", 10));
    }

    #[test]
    fn flow_range_excludes_flows_sharing_a_prefix() {
        let range = catalog_flow_range("order");
        assert!(range.contains(&catalog("order", 1)));
        assert!(!range.contains(&catalog("orders", 1)));
        let history_range_r1 = history_range(&run_id("r1"));
        assert!(!history_range_r1.contains(&history(&run_id("r10"), 1)));
        assert!(history_all_range().contains(&history(&run_id("r10"), 1)));
        assert!(!run_range().contains(&snapshot(&run_id("run"))));
    }

    #[test]
    fn malformed_keys_are_refused_with_the_kind_named() {
        let error = decode_active(&run(&run_id("r1"))).unwrap_err();
        assert!(matches!(error, Error::MalformedKey { kind: "active", .. }), "{error}");
        assert!(error.to_string().contains("\"run\""), "{error}");
        assert!(matches!(decode_history(b"\x02hist\x00\xff"), Err(Error::MalformedKey { kind: "history", .. })));
        assert!(matches!(decode_created(&active(&run_id("r1"))), Err(Error::MalformedKey { .. })));
        assert!(matches!(decode_catalog(b""), Err(Error::MalformedKey { .. })));
        assert!(matches!(decode_run(&active(&run_id("r1"))), Err(Error::MalformedKey { kind: "run", .. })));
        assert!(matches!(decode_snapshot(&run(&run_id("r1"))), Err(Error::MalformedKey { kind: "snapshot", .. })));
    }

    #[test]
    fn epoch_values_are_eight_bytes_big_endian() {
        assert_eq!(decode_epoch(None).unwrap(), Epoch(0));
        assert_eq!(decode_epoch(Some(&encode_epoch(Epoch(258)))).unwrap(), Epoch(258));
        assert_eq!(encode_epoch(Epoch(258)), vec![0, 0, 0, 0, 0, 0, 1, 2]);
        assert!(matches!(decode_epoch(Some(b"abc")), Err(Error::Corrupt { .. })));
    }
}
