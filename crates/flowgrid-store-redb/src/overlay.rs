//! A shard's committed writes that are durable in the journal but not yet in its file.
//! Reads look here first, then in the file.
//!
//! Two layers: `active` takes new commits; a checkpoint freezes it, writes the frozen
//! layer to the file and then drops it, while `active` starts again empty. A key's newest
//! state is in `active`, else in `frozen`, else in the file.
//!
//! A layer keeps its writes in commit order (a key's last write, a value or a tombstone,
//! is its state there), plus the ranges cleared in it, as disjoint pieces in key order,
//! each with how many writes the layer held when it was last cleared: a write before that
//! in the piece is hidden, one after it stands. A range clear so costs the pieces it
//! overlaps, not the layer's writes (an outbox message's every write and delete clears
//! its chunks' range: removing the earlier writes from the list made each clear cost the
//! whole layer, 20,000 of them in one layer 10 s of a debug build), and a checkpoint
//! applies a layer's cleared pieces before the writes that stand.
//!
//! Every commit appends to a layer, while only point reads (idempotent starts, run
//! lookups), listings and reloads read one. Appending to a list costs a commit little;
//! a hash map took a cache miss or two per key (5% of the coordinator's CPU with 1-task
//! runs). A point read scans the list from its end; once a layer's scans have compared
//! [`SCANS_BEFORE_INDEX`] times as many writes as it holds, it builds an index by key
//! and keeps it up to date from then on, so layers that are read often answer in
//! constant time and layers that are rarely read never pay for one.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use flowgrid_store::{Key, KeyRange, Mutation, Value};
use hashbrown::hash_table::{Entry, HashTable};

use crate::journal::Position;

/// How many writes a layer's scans compare, per write it holds, before it builds an
/// index. Comparing a key with a write took 0.4-2.8 ns, taking a write into the index
/// 11.5 ns (2,000 writes of 50-byte keys, release build): past this many scans, the
/// index would have cost less.
const SCANS_BEFORE_INDEX: usize = 8;

/// A write: the key and its value, or `None` for a tombstone.
type Write = (Key, Option<Value>);

/// What a layer holds for each write besides its key and value bytes: its entry in
/// `writes`, and its position in the index should lookups build one. Commits of empty keys
/// and values hold this much each all the same.
const WRITE_OVERHEAD_BYTES: usize = std::mem::size_of::<Write>() + std::mem::size_of::<usize>();
/// What a layer holds for one piece of its cleared ranges besides its bounds' bytes. A
/// range clear adds up to two pieces: its own, and the part after it of a piece it falls
/// inside, with copies of its bounds.
const CLEARED_PIECE_OVERHEAD_BYTES: usize = std::mem::size_of::<(Key, (Key, usize))>();

#[derive(Debug, Default)]
pub(crate) struct Layer {
    /// Every write, oldest first.
    writes: Vec<Write>,
    /// Where each key's last write is in `writes`, once lookups made it worth building.
    index: OnceLock<Index>,
    /// Writes compared by lookups while there was no index.
    scanned: AtomicUsize,
    cleared: Cleared,
    /// Memory held by the writes and clears: their keys and values, and what the layer
    /// keeps for each ([`WRITE_OVERHEAD_BYTES`], [`CLEARED_PIECE_OVERHEAD_BYTES`]). For the
    /// checkpoint trigger and the bound on commits waiting for their checkpoint.
    pub bytes: usize,
    /// End of the last journal frame applied.
    pub through: Option<Position>,
    /// When the first write arrived.
    pub since: Option<Instant>,
}

impl Layer {
    /// An empty layer with room for as many writes as this one holds: the layer that
    /// takes over after a checkpoint receives about as many.
    pub fn successor(&self) -> Layer {
        Layer { writes: Vec::with_capacity(self.writes.len()), ..Layer::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.cleared.is_empty()
    }

    pub fn apply(&mut self, mutations: Vec<Mutation>, through: Position) {
        self.writes.reserve(mutations.len());
        for mutation in mutations {
            match mutation {
                Mutation::Set(key, value) => {
                    self.bytes += WRITE_OVERHEAD_BYTES + key.len() + value.len();
                    self.push((key, Some(value)));
                }
                Mutation::Clear(key) => {
                    self.bytes += WRITE_OVERHEAD_BYTES + key.len();
                    self.push((key, None));
                }
                Mutation::ClearRange(range) => {
                    if range.is_empty() {
                        continue;
                    }
                    self.bytes += 2 * (CLEARED_PIECE_OVERHEAD_BYTES + range.begin.len() + range.end.len());
                    self.cleared.insert(range, self.writes.len());
                }
            }
        }
        self.through = Some(through);
        self.since.get_or_insert_with(Instant::now);
    }

    fn push(&mut self, write: Write) {
        self.writes.push(write);
        if let Some(index) = self.index.get_mut() {
            index.point_at(&self.writes, self.writes.len() - 1);
        }
    }

    /// `Some(value or None)` when this layer decides the key, `None` when it does not know it.
    fn lookup(&self, key: &[u8]) -> Option<Option<&Value>> {
        let position = match self.index.get() {
            Some(index) => index.find(&self.writes, key),
            None => {
                let position = self.writes.iter().rposition(|(written, _)| written.as_slice() == key);
                let compared = position.map_or(self.writes.len(), |position| self.writes.len() - position);
                let scanned = self.scanned.fetch_add(compared, Ordering::Relaxed) + compared;
                if scanned > SCANS_BEFORE_INDEX * self.writes.len() {
                    self.index.get_or_init(|| Index::build(&self.writes));
                }
                position
            }
        };
        let cleared_before = self.cleared.writes_before(key);
        match position {
            Some(position) if cleared_before.is_none_or(|before| position >= before) => {
                Some(self.writes[position].1.as_ref())
            }
            // Written, then cleared; or only cleared.
            Some(_) => Some(None),
            None => cleared_before.map(|_| None),
        }
    }

    /// Whether the write at `position` stands: no clear of its key came after it.
    fn stands(&self, position: usize, key: &[u8]) -> bool {
        self.cleared.writes_before(key).is_none_or(|before| position >= before)
    }

    /// The ranges cleared in this layer, disjoint, in key order.
    pub fn cleared(&self) -> impl Iterator<Item = KeyRange> + '_ {
        self.cleared.ranges()
    }

    /// Each key's last write, in key order: what a checkpoint writes to the file. In key
    /// order, neighbouring keys share leaf pages, which stay in the cache and are copied
    /// once per transaction instead of once per key.
    pub fn latest_by_key(&self) -> Vec<(&Key, &Option<Value>)> {
        let mut latest: Vec<(usize, &Write)> = self.writes.iter().enumerate().collect();
        // Stable: a key's writes stay in commit order, and the last one is kept.
        latest.sort_by_key(|(_, (key, _))| key);
        latest.dedup_by(|later, kept| {
            let same = later.1 .0 == kept.1 .0;
            if same {
                *kept = *later;
            }
            same
        });
        latest
            .into_iter()
            .filter(|(position, (key, _))| self.stands(*position, key))
            .map(|(_, (key, value))| (key, value))
            .collect()
    }

    /// The layer's writes in range that stand, oldest first.
    fn writes_in<'a>(&'a self, range: &'a KeyRange) -> impl Iterator<Item = &'a Write> + 'a {
        self.writes
            .iter()
            .enumerate()
            .filter(move |(position, (key, _))| range.contains(key) && self.stands(*position, key))
            .map(|(_, write)| write)
    }
}

/// Positions in a layer's writes by key, hashed from the key bytes the positions point at.
#[derive(Default)]
struct Index {
    hasher: foldhash::fast::RandomState,
    positions: HashTable<usize>,
}

impl fmt::Debug for Index {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("Index").field("keys", &self.positions.len()).finish()
    }
}

impl Index {
    fn build(writes: &[Write]) -> Index {
        let mut index = Index { positions: HashTable::with_capacity(writes.len()), ..Index::default() };
        for position in 0..writes.len() {
            index.point_at(writes, position);
        }
        index
    }

    /// Makes the key of `writes[position]` point at `position`, its newest write.
    fn point_at(&mut self, writes: &[Write], position: usize) {
        let Index { hasher, positions } = self;
        let key = writes[position].0.as_slice();
        let hash = hasher.hash_one(key);
        let same_key = |other: &usize| writes[*other].0.as_slice() == key;
        let rehash = |other: &usize| hasher.hash_one(writes[*other].0.as_slice());
        match positions.entry(hash, same_key, rehash) {
            Entry::Occupied(mut entry) => *entry.get_mut() = position,
            Entry::Vacant(entry) => {
                entry.insert(position);
            }
        }
    }

    fn find(&self, writes: &[Write], key: &[u8]) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        self.positions.find(hash, |position| writes[*position].0.as_slice() == key).copied()
    }
}

/// The ranges cleared in a layer: disjoint pieces by their first key, each with its end and
/// how many writes the layer held when the last clear covering it came.
#[derive(Debug, Default)]
struct Cleared {
    pieces: BTreeMap<Key, (Key, usize)>,
}

impl Cleared {
    fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Clears `range` after the layer's first `writes` writes: the pieces it overlaps give
    /// way to it, keeping what lies outside it.
    fn insert(&mut self, range: KeyRange, writes: usize) {
        let KeyRange { begin, end } = range;
        // A piece that starts before the range and reaches into it keeps its part before.
        if let Some((_, (piece_end, piece_writes))) =
            self.pieces.range_mut::<[u8], _>((Bound::Unbounded, Bound::Excluded(begin.as_slice()))).next_back()
        {
            if *piece_end > begin {
                let tail = (std::mem::replace(piece_end, begin.clone()), *piece_writes);
                if tail.0 > end {
                    self.pieces.insert(end.clone(), tail);
                }
            }
        }
        // The pieces that start inside the range go; the last one keeps its part after it.
        let inside: Vec<Key> = self.pieces.range(begin.clone()..end.clone()).map(|(start, _)| start.clone()).collect();
        for start in inside {
            let (piece_end, piece_writes) = self.pieces.remove(&start).expect("listed");
            if piece_end > end {
                self.pieces.insert(end.clone(), (piece_end, piece_writes));
            }
        }
        self.pieces.insert(begin, (end, writes));
    }

    /// How many writes came before the last clear of `key`; `None` if it was not cleared.
    fn writes_before(&self, key: &[u8]) -> Option<usize> {
        // Most layers clear nothing: no lookup in them pays for the map.
        if self.pieces.is_empty() {
            return None;
        }
        let (_, (end, writes)) = self.pieces.range::<[u8], _>((Bound::Unbounded, Bound::Included(key))).next_back()?;
        (key < end.as_slice()).then_some(*writes)
    }

    fn ranges(&self) -> impl Iterator<Item = KeyRange> + '_ {
        self.pieces.iter().map(|(begin, (end, _))| KeyRange { begin: begin.clone(), end: end.clone() })
    }

    /// The pieces that overlap `range`, whole.
    fn overlapping(&self, range: &KeyRange) -> Vec<KeyRange> {
        if range.is_empty() {
            return Vec::new();
        }
        let (begin, end) = (range.begin.as_slice(), range.end.as_slice());
        let before = self
            .pieces
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(begin)))
            .next_back()
            .filter(|(_, (piece_end, _))| piece_end.as_slice() > begin);
        let from = self.pieces.range::<[u8], _>((Bound::Included(begin), Bound::Excluded(end)));
        before
            .into_iter()
            .chain(from)
            .map(|(begin, (end, _))| KeyRange { begin: begin.clone(), end: end.clone() })
            .collect()
    }
}

/// `ranges` merged where they overlap or touch, in key order.
fn disjoint(mut ranges: Vec<KeyRange>) -> Vec<KeyRange> {
    ranges.sort_by(|a, b| a.begin.cmp(&b.begin));
    let mut merged: Vec<KeyRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.begin <= last.end => {
                if range.end > last.end {
                    last.end = range.end;
                }
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// Whether `key` lies in one of `ranges` (disjoint, in key order).
fn in_any(ranges: &[KeyRange], key: &[u8]) -> bool {
    let after = ranges.partition_point(|range| range.begin.as_slice() <= key);
    after > 0 && key < ranges[after - 1].end.as_slice()
}

#[derive(Debug, Default)]
pub(crate) struct Overlay {
    pub active: Layer,
    pub frozen: Option<Arc<Layer>>,
    /// Set while the shard's checkpoints fail; cleared by the next one that succeeds.
    pub failure: Option<CheckpointFailure>,
}

/// Why the shard's last checkpoint failed, how many failed in a row, and when the next
/// one may try.
#[derive(Debug)]
pub(crate) struct CheckpointFailure {
    pub message: String,
    pub failures: u64,
    pub retry_at: Instant,
}

/// What the overlay says about one key.
pub(crate) enum Lookup {
    Value(Value),
    Absent,
    /// Not in the overlay: read the file.
    Unknown,
}

/// The overlay's part of one range, to merge with the file's.
pub(crate) struct RangeView {
    /// Newest state of every overlay key in the range.
    entries: Vec<(Key, Option<Value>)>,
    /// Ranges whose file entries are hidden (cleared in the overlay): disjoint, in key
    /// order.
    cleared: Vec<KeyRange>,
}

impl Overlay {
    pub fn get(&self, key: &[u8]) -> Lookup {
        let decided = self.active.lookup(key).or_else(|| self.frozen.as_ref().and_then(|frozen| frozen.lookup(key)));
        match decided {
            Some(Some(value)) => Lookup::Value(value.clone()),
            Some(None) => Lookup::Absent,
            None => Lookup::Unknown,
        }
    }

    pub fn bytes(&self) -> usize {
        self.active.bytes + self.frozen.as_ref().map_or(0, |frozen| frozen.bytes)
    }

    pub fn view(&self, range: &KeyRange) -> RangeView {
        let mut entries: BTreeMap<Key, Option<Value>> = BTreeMap::new();
        let mut cleared = Vec::new();
        if let Some(frozen) = &self.frozen {
            for (key, value) in frozen.writes_in(range) {
                // Every clear of the active layer came after the frozen layer's writes.
                if self.active.cleared.writes_before(key).is_none() {
                    entries.insert(key.clone(), value.clone());
                }
            }
            cleared.extend(frozen.cleared.overlapping(range));
        }
        // Oldest first, so a key's newest write is the one that stays.
        for (key, value) in self.active.writes_in(range) {
            entries.insert(key.clone(), value.clone());
        }
        cleared.extend(self.active.cleared.overlapping(range));
        RangeView { entries: entries.into_iter().collect(), cleared: disjoint(cleared) }
    }
}

impl RangeView {
    /// Merges the file's pairs (`file`, in scan order) with the overlay: overlay entries
    /// win, tombstones and cleared ranges hide file pairs. Stops after `limit` pairs.
    pub fn merge<E>(
        self,
        file: impl Iterator<Item = Result<(Key, Value), E>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Key, Value)>, E> {
        let RangeView { mut entries, cleared } = self;
        if reverse {
            entries.reverse();
        }
        let mut overlay = entries.into_iter().peekable();
        let mut file = file.filter(|pair| match pair {
            Ok((key, _)) => !in_any(&cleared, key),
            Err(_) => true,
        });
        let mut next_file = file.next().transpose()?;
        let mut out = Vec::new();
        // `before(a, b)`: `a` comes first in scan order.
        let before = |a: &[u8], b: &[u8]| if reverse { a > b } else { a < b };
        while out.len() < limit {
            let take_overlay = match (overlay.peek(), &next_file) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((overlay_key, _)), Some((file_key, _))) => {
                    if overlay_key == file_key {
                        // The overlay's state replaces the file's.
                        next_file = file.next().transpose()?;
                        true
                    } else {
                        before(overlay_key, file_key)
                    }
                }
            };
            if take_overlay {
                let (key, value) = overlay.next().expect("peeked");
                if let Some(value) = value {
                    out.push((key, value));
                }
            } else {
                out.push(next_file.take().expect("matched Some"));
                next_file = file.next().transpose()?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> Key {
        text.as_bytes().to_vec()
    }

    fn range(begin: &str, end: &str) -> KeyRange {
        KeyRange { begin: key(begin), end: key(end) }
    }

    fn file(pairs: &[(&str, &str)]) -> Vec<Result<(Key, Value), ()>> {
        pairs.iter().map(|(k, v)| Ok((key(k), key(v)))).collect()
    }

    fn keys_of(pairs: Vec<(Key, Value)>) -> Vec<String> {
        pairs
            .into_iter()
            .map(|(k, v)| format!("{}={}", String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn newest_layer_wins_and_clears_hide_the_file() {
        let mut frozen = Layer::default();
        frozen.apply(
            vec![Mutation::Set(key("b"), key("frozen")), Mutation::Set(key("d"), key("frozen"))],
            Position::default(),
        );
        let mut overlay = Overlay { active: Layer::default(), frozen: Some(Arc::new(frozen)), failure: None };
        overlay.active.apply(
            vec![
                Mutation::ClearRange(range("c", "e")),
                Mutation::Set(key("a"), key("active")),
                Mutation::Clear(key("f")),
                Mutation::Set(key("c2"), key("after-clear")),
            ],
            Position::default(),
        );
        assert!(matches!(overlay.get(b"b"), Lookup::Value(value) if value == key("frozen")));
        assert!(matches!(overlay.get(b"d"), Lookup::Absent), "the active clear hides the frozen entry");
        assert!(matches!(overlay.get(b"f"), Lookup::Absent));
        assert!(matches!(overlay.get(b"g"), Lookup::Unknown));
        let stored = file(&[("a", "file"), ("c", "file"), ("cc", "file"), ("f", "file"), ("g", "file")]);
        let forward = overlay.view(&range("a", "z")).merge(stored.clone().into_iter(), usize::MAX, false).unwrap();
        assert_eq!(keys_of(forward), ["a=active", "b=frozen", "c2=after-clear", "g=file"]);
        let mut reversed = stored;
        reversed.reverse();
        let backward = overlay.view(&range("a", "z")).merge(reversed.into_iter(), 2, true).unwrap();
        assert_eq!(keys_of(backward), ["g=file", "c2=after-clear"]);
    }

    /// What a layer should say, kept the plain way: each key's last write, and the ranges
    /// cleared (which also drop the earlier writes in them).
    #[derive(Default)]
    struct Model {
        decided: BTreeMap<Key, Option<Value>>,
        cleared: Vec<KeyRange>,
    }

    impl Model {
        fn apply(&mut self, mutation: &Mutation) {
            match mutation {
                Mutation::Set(key, value) => {
                    self.decided.insert(key.clone(), Some(value.clone()));
                }
                Mutation::Clear(key) => {
                    self.decided.insert(key.clone(), None);
                }
                Mutation::ClearRange(range) if !range.is_empty() => {
                    self.decided.retain(|key, _| !range.contains(key));
                    self.cleared.push(range.clone());
                }
                Mutation::ClearRange(_) => {}
            }
        }

        fn lookup(&self, key: &[u8]) -> Option<Option<Value>> {
            if let Some(decided) = self.decided.get(key) {
                return Some(decided.clone());
            }
            self.cleared.iter().any(|range| range.contains(key)).then_some(None)
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(Mutation),
        Lookup(Key),
        /// Builds the index now, as enough scans would, so both ways of looking up are tried.
        Index,
    }

    fn short_key() -> impl proptest::strategy::Strategy<Value = Key> {
        proptest::collection::vec(b'a'..=b'd', 1..3)
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (short_key(), any::<u8>()).prop_map(|(key, value)| Op::Write(Mutation::Set(key, vec![value]))),
            1 => short_key().prop_map(|key| Op::Write(Mutation::Clear(key))),
            1 => (short_key(), short_key())
                .prop_map(|(begin, end)| Op::Write(Mutation::ClearRange(KeyRange { begin, end }))),
            5 => short_key().prop_map(Op::Lookup),
            1 => Just(Op::Index),
        ]
    }

    proptest::proptest! {
        /// Lookups (with and without the index they build) and the checkpoint's writes
        /// agree with the plain model, whatever the order of writes, clears and reads.
        #[test]
        fn a_layer_answers_as_its_writes_say(ops in proptest::collection::vec(op(), 1..300)) {
            let mut layer = Layer::default();
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Write(mutation) => {
                        model.apply(&mutation);
                        layer.apply(vec![mutation], Position::default());
                    }
                    Op::Lookup(key) => {
                        let found = layer.lookup(&key).map(|value| value.cloned());
                        proptest::prop_assert_eq!(found, model.lookup(&key), "key {:?}", key);
                    }
                    Op::Index => {
                        layer.index.get_or_init(|| Index::build(&layer.writes));
                    }
                }
            }
            let latest: Vec<(Key, Option<Value>)> =
                layer.latest_by_key().into_iter().map(|(key, value)| (key.clone(), value.clone())).collect();
            let expected: Vec<(Key, Option<Value>)> = model.decided.into_iter().collect();
            proptest::prop_assert_eq!(latest, expected);
        }
    }

    /// The whole store the plain way: `file`, then each mutation in order.
    fn apply_plainly(file: &mut BTreeMap<Key, Value>, mutation: &Mutation) {
        match mutation {
            Mutation::Set(key, value) => {
                file.insert(key.clone(), value.clone());
            }
            Mutation::Clear(key) => {
                file.remove(key);
            }
            Mutation::ClearRange(range) => file.retain(|key, _| !range.contains(key)),
        }
    }

    fn mutation() -> impl proptest::strategy::Strategy<Value = Mutation> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (short_key(), any::<u8>()).prop_map(|(key, value)| Mutation::Set(key, vec![value])),
            1 => short_key().prop_map(Mutation::Clear),
            1 => (short_key(), short_key()).prop_map(|(begin, end)| Mutation::ClearRange(KeyRange { begin, end })),
        ]
    }

    proptest::proptest! {
        /// A frozen and an active layer over a file read as the file with both layers'
        /// mutations applied in order: point reads, and range scans forward and backward.
        #[test]
        fn an_overlay_over_a_file_reads_as_its_mutations_say(
            file in proptest::collection::btree_map(short_key(), proptest::collection::vec(0u8..4, 1), 0..12),
            frozen in proptest::collection::vec(mutation(), 0..40),
            active in proptest::collection::vec(mutation(), 0..40),
            scan in (short_key(), short_key()),
        ) {
            let mut expected = file.clone();
            let mut frozen_layer = Layer::default();
            for mutation in &frozen {
                apply_plainly(&mut expected, mutation);
            }
            frozen_layer.apply(frozen, Position::default());
            let mut overlay = Overlay { active: Layer::default(), frozen: Some(Arc::new(frozen_layer)), failure: None };
            for mutation in &active {
                apply_plainly(&mut expected, mutation);
            }
            overlay.active.apply(active, Position::default());
            for key in file.keys().chain(expected.keys()) {
                let read = match overlay.get(key) {
                    Lookup::Value(value) => Some(value),
                    Lookup::Absent => None,
                    Lookup::Unknown => file.get(key).cloned(),
                };
                proptest::prop_assert_eq!(read.as_ref(), expected.get(key), "key {:?}", key);
            }
            let range = KeyRange { begin: scan.0, end: scan.1 };
            let in_file = || file.iter().filter(|(key, _)| range.contains(key)).map(|(k, v)| Ok::<_, ()>((k.clone(), v.clone())));
            let want: Vec<(Key, Value)> =
                expected.iter().filter(|(key, _)| range.contains(key)).map(|(k, v)| (k.clone(), v.clone())).collect();
            let forward = overlay.view(&range).merge(in_file(), usize::MAX, false).unwrap();
            proptest::prop_assert_eq!(&forward, &want);
            let backward = overlay.view(&range).merge(in_file().collect::<Vec<_>>().into_iter().rev(), 3, true).unwrap();
            let want_back: Vec<(Key, Value)> = want.into_iter().rev().take(3).collect();
            proptest::prop_assert_eq!(backward, want_back);
        }
    }

    #[test]
    fn lookups_that_scan_often_build_an_index_that_later_writes_keep() {
        let mut layer = Layer::default();
        let writes = (0..10).map(|n| Mutation::Set(key(&format!("k{n}")), key("v"))).collect();
        layer.apply(writes, Position::default());
        for _ in 0..SCANS_BEFORE_INDEX {
            assert!(layer.lookup(b"missing").is_none());
        }
        assert!(layer.index.get().is_none(), "a few scans do not build the index");
        assert!(layer.lookup(b"missing").is_none());
        assert!(layer.index.get().is_some(), "scans over {SCANS_BEFORE_INDEX} times the layer build it");
        layer.apply(vec![Mutation::Set(key("k3"), key("new")), Mutation::Clear(key("k4"))], Position::default());
        assert_eq!(layer.lookup(b"k3"), Some(Some(&key("new"))));
        assert_eq!(layer.lookup(b"k4"), Some(None));
        assert_eq!(layer.lookup(b"k5"), Some(Some(&key("v"))));
        layer.apply(vec![Mutation::ClearRange(range("k0", "k2"))], Position::default());
        assert!(layer.index.get().is_some(), "a range clear moves no write: the index stays");
        assert_eq!(layer.lookup(b"k1"), Some(None));
        assert_eq!(layer.lookup(b"k3"), Some(Some(&key("new"))));
        layer.apply(vec![Mutation::Set(key("k1"), key("again"))], Position::default());
        assert_eq!(layer.lookup(b"k1"), Some(Some(&key("again"))), "a write after the clear stands");
        assert_eq!(layer.lookup(b"k0"), Some(None));
    }
}
