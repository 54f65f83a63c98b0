//! A shard's committed writes that are durable in the journal but not yet in its file.
//! Reads look here first, then in the file.
//!
//! Two layers: `active` takes new commits; a checkpoint freezes it, writes the frozen
//! layer to the file and then drops it, while `active` starts again empty. A key's newest
//! state is in `active`, else in `frozen`, else in the file.
//!
//! A layer keeps, per key, its last value or a tombstone, plus the ranges cleared in it.
//! A range clear removes the layer's earlier entries in the range, so an entry present in
//! a cleared range was written after the clear, and a checkpoint applies a layer's
//! cleared ranges before its entries.
//!
//! A layer's entries are a hash map: every commit inserts into it, while only reloads and
//! listings read a range of it (sorting what they take), and a checkpoint needs no order.
//! A B-tree spent most of a commit's overlay time comparing keys that share long prefixes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use flowgrid_store::{Key, KeyRange, Mutation, Value};

use crate::journal::Position;

#[derive(Debug, Default)]
pub(crate) struct Layer {
    pub entries: HashMap<Key, Option<Value>, foldhash::fast::RandomState>,
    pub cleared: Vec<KeyRange>,
    /// Bytes of keys and values held, for the checkpoint trigger.
    pub bytes: usize,
    /// End of the last journal frame applied.
    pub through: Option<Position>,
    /// When the first write arrived.
    pub since: Option<Instant>,
}

impl Layer {
    /// An empty layer with room for as many entries as this one holds: the layer that
    /// takes over after a checkpoint receives about as many writes, and growing a hash map
    /// from empty rehashes every entry again at each doubling.
    pub fn successor(&self) -> Layer {
        let entries = HashMap::with_capacity_and_hasher(self.entries.len(), Default::default());
        Layer { entries, ..Layer::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.cleared.is_empty()
    }

    pub fn apply(&mut self, mutations: Vec<Mutation>, through: Position) {
        for mutation in mutations {
            match mutation {
                Mutation::Set(key, value) => {
                    self.bytes += key.len() + value.len();
                    self.entries.insert(key, Some(value));
                }
                Mutation::Clear(key) => {
                    self.bytes += key.len();
                    self.entries.insert(key, None);
                }
                Mutation::ClearRange(range) => {
                    if range.is_empty() {
                        continue;
                    }
                    self.entries.retain(|key, _| !range.contains(key));
                    self.bytes += range.begin.len() + range.end.len();
                    self.cleared.push(range);
                }
            }
        }
        self.through = Some(through);
        self.since.get_or_insert_with(Instant::now);
    }

    /// `Some(value or None)` when this layer decides the key, `None` when it does not know it.
    fn lookup(&self, key: &[u8]) -> Option<Option<&Value>> {
        if let Some(entry) = self.entries.get(key) {
            return Some(entry.as_ref());
        }
        self.cleared.iter().any(|range| range.contains(key)).then_some(None)
    }
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
    /// Ranges whose file entries are hidden (cleared in the overlay).
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
        let in_range = |(key, _): &(&Key, &Option<Value>)| range.contains(key);
        let mut entries: BTreeMap<Key, Option<Value>> = BTreeMap::new();
        let mut cleared = Vec::new();
        if let Some(frozen) = &self.frozen {
            for (key, value) in frozen.entries.iter().filter(in_range) {
                if !self.active.cleared.iter().any(|cleared| cleared.contains(key)) {
                    entries.insert(key.clone(), value.clone());
                }
            }
            cleared.extend(frozen.cleared.iter().cloned());
        }
        for (key, value) in self.active.entries.iter().filter(in_range) {
            entries.insert(key.clone(), value.clone());
        }
        cleared.extend(self.active.cleared.iter().cloned());
        cleared.retain(|cleared| cleared.begin < range.end && range.begin < cleared.end);
        RangeView { entries: entries.into_iter().collect(), cleared }
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
            Ok((key, _)) => !cleared.iter().any(|range| range.contains(key)),
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
}
