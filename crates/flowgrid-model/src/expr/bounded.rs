//! Functions of the standard packages that build values item by item, registered again
//! with their bounds checked as they go.
//!
//! Rhai checks a value's size only once the function that made it returns: `map` over
//! 10,000 items whose closure gives a megabyte each would hold 10 GB before the check,
//! `reduce(|acc, x| [acc])` would nest a value 10,000 levels deep (and the recursive size
//! check, the conversion to JSON or the drop of it would overflow the stack), `replace`
//! can multiply a text past any memory, and `split` makes a string of its own of every
//! byte. The package's `pad` of a text never ends with an empty padding, and that of an
//! array overflows as it sizes what it would make. Rhai's check does not count the values
//! a function pointer holds (`curry(|b| b, input.big)`), so copies of one slip past it.
//! The versions here stop at the bound instead, and count what function pointers hold.
//! Functions registered on the engine are found before the packages'.

use rhai::{Array, Dynamic, EvalAltResult, FnPtr, FuncRegistration, ImmutableString, NativeCallContext, INT};

use crate::limits::Limits;

/// How deeply an expression's value may nest (arrays and maps in one another): twice the
/// depth any input or output may have, so that a map's merged outputs can be wrapped
/// again, and half the depth the protocol decodes (128), so that every record holding
/// the value still decodes.
pub const VALUE_DEPTH_MAX: usize = 64;

type Outcome<T> = Result<T, Box<EvalAltResult>>;

/// What one value may hold, as Rhai counts it: array entries, map entries and string
/// bytes inside it, nested ones included (and, unlike Rhai, those a function pointer
/// holds).
#[derive(Clone, Copy)]
struct Bounds {
    array_entries: usize,
    map_entries: usize,
    text_bytes: usize,
}

/// What the values made so far hold, counted as [`Bounds`] counts.
#[derive(Default)]
struct Made {
    array_entries: usize,
    map_entries: usize,
    text_bytes: usize,
    /// Values walked to count them (arrays, maps, function pointers and their entries),
    /// for the work a walk costs.
    visited: u64,
}

impl Made {
    /// Counts `value` as one more entry of the array being made; an error once the array
    /// would be over `bounds` or `value` nests deeper than [`VALUE_DEPTH_MAX`].
    fn add_entry(&mut self, value: &Dynamic, bounds: Bounds, made_by: &str) -> Outcome<()> {
        self.array_entries += 1;
        self.add_counted(value, bounds, "array", made_by)
    }

    /// Counts `value` as one more entry of the object map being made, as
    /// [`Made::add_entry`] does for an array.
    fn add_map_entry(&mut self, value: &Dynamic, bounds: Bounds, made_by: &str) -> Outcome<()> {
        self.map_entries += 1;
        self.add_counted(value, bounds, "object map", made_by)
    }

    /// Counts `value` as the whole of what `made_by` makes, as [`Made::add_entry`] counts an
    /// entry (`reduce`'s value, carried from item to item).
    fn add_value(&mut self, value: &Dynamic, bounds: Bounds, made_by: &str) -> Outcome<()> {
        self.add_counted(value, bounds, "value", made_by)
    }

    fn add_counted(&mut self, value: &Dynamic, bounds: Bounds, kind: &str, made_by: &str) -> Outcome<()> {
        self.add(value, VALUE_DEPTH_MAX, made_by)?;
        self.check(bounds, kind, made_by)
    }

    /// An error if what is counted is over `bounds`.
    fn check(&self, bounds: Bounds, kind: &str, made_by: &str) -> Outcome<()> {
        let over = self.array_entries > bounds.array_entries
            || self.map_entries > bounds.map_entries
            || self.text_bytes > bounds.text_bytes;
        if over {
            return Err(too_large(&format!("the {kind} {made_by} makes")));
        }
        Ok(())
    }

    fn add(&mut self, value: &Dynamic, depth_left: usize, made_by: &str) -> Outcome<()> {
        self.visited += 1;
        if let Some(array) = value.read_lock::<Array>() {
            let depth_left = depth_left.checked_sub(1).ok_or_else(|| too_deep(made_by))?;
            return self.add_entries(&array, depth_left, made_by);
        }
        if let Some(map) = value.read_lock::<rhai::Map>() {
            let depth_left = depth_left.checked_sub(1).ok_or_else(|| too_deep(made_by))?;
            self.map_entries = self.map_entries.saturating_add(map.len());
            return map.values().try_for_each(|entry| self.add(entry, depth_left, made_by));
        }
        // The values curried into a function pointer (a closure's captured variables among
        // them) are copied with it: they count as the entries of an array in its place.
        if let Some(pointer) = value.read_lock::<FnPtr>() {
            let depth_left = depth_left.checked_sub(1).ok_or_else(|| too_deep(made_by))?;
            return self.add_entries(pointer.curry(), depth_left, made_by);
        }
        if let Ok(text) = value.as_immutable_string_ref() {
            self.text_bytes = self.text_bytes.saturating_add(text.len());
        }
        Ok(())
    }

    /// Counts `entries` as those of an array, each `depth_left` levels from the bound.
    fn add_entries(&mut self, entries: &[Dynamic], depth_left: usize, made_by: &str) -> Outcome<()> {
        self.array_entries = self.array_entries.saturating_add(entries.len());
        entries.iter().try_for_each(|entry| self.add(entry, depth_left, made_by))
    }
}

/// The error for a value `what` names that would be over its bounds.
fn too_large(what: &str) -> Box<EvalAltResult> {
    EvalAltResult::ErrorDataTooLarge(what.to_owned(), rhai::Position::NONE).into()
}

/// Entries of a value walked for one operation of the budget: a walk is Rust's work,
/// which Rhai does not count, and a value walked again at each step of a `reduce` would
/// make the work of an evaluation grow past what its budget says.
const ENTRIES_WALKED_PER_OPERATION: u64 = 16;

/// The error for a value nested deeper than [`VALUE_DEPTH_MAX`].
pub(super) fn too_deep(made_by: &str) -> Box<EvalAltResult> {
    EvalAltResult::ErrorRuntime(
        format!(
            "the value {made_by} makes nests deeper than {VALUE_DEPTH_MAX} levels (arrays and maps in one another): \
             build a flatter value"
        )
        .into(),
        rhai::Position::NONE,
    )
    .into()
}

/// Registers `map`, `zip`, `reduce`, `reduce_rev`, `replace`, `split`, `split_rev`,
/// `to_chars` and `pad` in their bounded forms.
pub(super) fn register(engine: &mut rhai::Engine, limits: &Limits) {
    let bounds = Bounds {
        array_entries: limits.map_items_max.max(1),
        map_entries: limits.map_items_max.max(1),
        text_bytes: limits.expression_text_bytes_max.max(1),
    };
    register_map_and_zip(engine, bounds);
    register_reduce(engine, bounds, limits.expression_operations_max.max(1));
    register_replace(engine, bounds.text_bytes);
    register_split(engine, bounds.array_entries);
    register_pad(engine, bounds);
}

/// The string's `split`, `split_rev` and `to_chars`, as the package has them, but the
/// pieces are counted before they are made: one byte of text makes a string of its own
/// (some 60 bytes), so a text within its bound would make an array gigabytes large
/// before Rhai's check of its size.
fn register_split(engine: &mut rhai::Engine, entries_max: usize) {
    /// The whole text where the package's gives it (`whole`), or the pieces `make` gives if
    /// there are no more than `entries_max`.
    fn pieces<'a, I: Iterator<Item = &'a str>>(
        text: &'a ImmutableString,
        whole: bool,
        make: impl Fn() -> I,
        entries_max: usize,
    ) -> Outcome<Array> {
        if whole {
            return Ok(vec![text.clone().into()]);
        }
        if make().count() > entries_max {
            let what = "the array of pieces split makes".to_owned();
            return Err(EvalAltResult::ErrorDataTooLarge(what, rhai::Position::NONE).into());
        }
        Ok(make().map(|piece| Dynamic::from(ImmutableString::from(piece))).collect())
    }
    fn segments_of(segments: INT) -> usize {
        usize::try_from(segments).unwrap_or(usize::MAX)
    }
    // The cases that give the whole text, as the package's.
    let unsplit = |text: &str, delimiter: &str| text.is_empty() || (!delimiter.is_empty() && !text.contains(delimiter));
    let unsplit_char = |text: &str, delimiter: char| text.is_empty() || !text.contains(delimiter);
    // `split` and `split_rev` by a text or a character, into every piece or at most
    // `segments`, with the `str` methods that split forwards or backwards.
    macro_rules! register_forms {
        ($name:literal, $split:ident, $splitn:ident) => {
            let registration = FuncRegistration::new($name).with_purity(true);
            registration.clone().register_into_engine(engine, move |text: &mut ImmutableString, delimiter: &str| {
                pieces(text, unsplit(text, delimiter), || text.$split(delimiter), entries_max)
            });
            registration.clone().register_into_engine(
                engine,
                move |text: &mut ImmutableString, delimiter: &str, segments: INT| {
                    let whole = segments <= 1 || unsplit(text, delimiter);
                    pieces(text, whole, || text.$splitn(segments_of(segments), delimiter), entries_max)
                },
            );
            registration.clone().register_into_engine(engine, move |text: &mut ImmutableString, delimiter: char| {
                pieces(text, unsplit_char(text, delimiter), || text.$split(delimiter), entries_max)
            });
            registration.register_into_engine(
                engine,
                move |text: &mut ImmutableString, delimiter: char, segments: INT| {
                    let whole = segments <= 1 || unsplit_char(text, delimiter);
                    pieces(text, whole, || text.$splitn(segments_of(segments), delimiter), entries_max)
                },
            );
        };
    }
    register_forms!("split", split, splitn);
    register_forms!("split_rev", rsplit, rsplitn);
    FuncRegistration::new("split").with_purity(true).register_into_engine(engine, move |text: &mut ImmutableString| {
        pieces(text, text.is_empty(), || text.split_whitespace(), entries_max)
    });
    FuncRegistration::new("to_chars").register_into_engine(engine, move |text: &str| -> Outcome<Array> {
        if text.chars().count() > entries_max {
            let what = "the array of characters to_chars makes".to_owned();
            return Err(EvalAltResult::ErrorDataTooLarge(what, rhai::Position::NONE).into());
        }
        Ok(text.chars().map(Dynamic::from).collect())
    });
}

/// `map` (of an array or an object map) and `zip`: what they make is measured entry by
/// entry.
fn register_map_and_zip(engine: &mut rhai::Engine, bounds: Bounds) {
    // Pure, as the package's: a method on a variable reads it, and never writes it back.
    fn map_array(context: &NativeCallContext, array: &mut Array, mapper: &FnPtr, bounds: Bounds) -> Outcome<Array> {
        let mut made = Made::default();
        let mut mapped = Array::with_capacity(array.len());
        for (index, item) in array.iter_mut().enumerate() {
            let index = [Dynamic::from(INT::try_from(index).unwrap_or(INT::MAX))];
            let value = mapper.call_raw_with_extra_args("map", context, Some(item), [], index, Some(0))?;
            made.add_entry(&value, bounds, "map")?;
            mapped.push(value);
        }
        Ok(mapped)
    }
    let map = FuncRegistration::new("map").with_purity(true);
    map.clone().register_into_engine(engine, move |context: NativeCallContext, array: &mut Array, mapper: FnPtr| {
        map_array(&context, array, &mapper, bounds)
    });
    // The form that names a function (`input.a.map("to_string")`).
    map.register_into_engine(engine, move |context: NativeCallContext, array: &mut Array, mapper: &str| {
        map_array(&context, array, &FnPtr::new(mapper)?, bounds)
    });
    FuncRegistration::new("map").with_purity(true).register_into_engine(
        engine,
        move |context: NativeCallContext, map: &mut rhai::Map, mapper: FnPtr| -> Outcome<rhai::Map> {
            let mut made = Made::default();
            let mut mapped = rhai::Map::new();
            for (key, value) in map.iter_mut() {
                let key_argument = [Dynamic::from(ImmutableString::from(key.as_str()))];
                let value = mapper.call_raw_with_extra_args("map", &context, Some(value), key_argument, [], Some(1))?;
                made.add_map_entry(&value, bounds, "map")?;
                mapped.insert(key.clone(), value);
            }
            Ok(mapped)
        },
    );
    FuncRegistration::new("zip").with_purity(true).register_into_engine(
        engine,
        move |context: NativeCallContext, first: &mut Array, second: Array, mapper: FnPtr| -> Outcome<Array> {
            let mut made = Made::default();
            let mut zipped = Array::with_capacity(first.len().min(second.len()));
            for (index, (left, right)) in first.iter().zip(second).enumerate() {
                let index = [Dynamic::from(INT::try_from(index).unwrap_or(INT::MAX))];
                let value =
                    mapper.call_raw_with_extra_args("zip", &context, None, [left.clone(), right], index, None)?;
                made.add_entry(&value, bounds, "zip")?;
                zipped.push(value);
            }
            Ok(zipped)
        },
    );
}

/// `reduce` and `reduce_rev`, with and without an initial value: the value carried from
/// item to item may not nest deeper than [`VALUE_DEPTH_MAX`], nor be over `bounds` (which
/// Rhai checks too as the functions that grow it return, but without what function
/// pointers hold: `acc + [curry(|b| b, input.big)]` copies `input.big` at every item).
fn register_reduce(engine: &mut rhai::Engine, bounds: Bounds, operations_max: u64) {
    struct Reduce<'a> {
        name: &'a str,
        reverse: bool,
        bounds: Bounds,
        operations_max: u64,
    }
    fn reduce(
        context: &NativeCallContext,
        array: &mut Array,
        reducer: &FnPtr,
        initial: Dynamic,
        how: &Reduce,
    ) -> Outcome<Dynamic> {
        let length = array.len();
        let mut result = initial;
        for position in 0..length {
            let index = if how.reverse { length - 1 - position } else { position };
            let extra = [Dynamic::from(INT::try_from(index).unwrap_or(INT::MAX))];
            let item = Some(&mut array[index]);
            result = reducer.call_raw_with_extra_args(how.name, context, item, [result], extra, Some(1))?;
            let mut made = Made::default();
            made.add_value(&result, how.bounds, how.name)?;
            super::charge_operations(made.visited / ENTRIES_WALKED_PER_OPERATION, how.operations_max)?;
        }
        Ok(result)
    }
    for (name, reverse) in [("reduce", false), ("reduce_rev", true)] {
        let how = Reduce { name, reverse, bounds, operations_max };
        FuncRegistration::new(name).with_purity(true).register_into_engine(
            engine,
            move |context: NativeCallContext, array: &mut Array, reducer: FnPtr| {
                reduce(&context, array, &reducer, Dynamic::UNIT, &how)
            },
        );
        let how = Reduce { name, reverse, bounds, operations_max };
        FuncRegistration::new(name).with_purity(true).register_into_engine(
            engine,
            move |context: NativeCallContext, array: &mut Array, reducer: FnPtr, initial: Dynamic| {
                reduce(&context, array, &reducer, initial, &how)
            },
        );
        // The forms that name a function (`input.a.reduce("max")`).
        let how = Reduce { name, reverse, bounds, operations_max };
        FuncRegistration::new(name).with_purity(true).register_into_engine(
            engine,
            move |context: NativeCallContext, array: &mut Array, reducer: &str| {
                reduce(&context, array, &FnPtr::new(reducer)?, Dynamic::UNIT, &how)
            },
        );
        let how = Reduce { name, reverse, bounds, operations_max };
        FuncRegistration::new(name).with_purity(true).register_into_engine(
            engine,
            move |context: NativeCallContext, array: &mut Array, reducer: &str, initial: Dynamic| {
                reduce(&context, array, &FnPtr::new(reducer)?, initial, &how)
            },
        );
    }
}

/// `replace` as the string package has it, but refused before it builds a string over
/// `text_bytes_max`: a replacement that grows the text multiplies it (`input.s.replace("y",
/// input.s)` over a megabyte of `y` is a terabyte). The forms that cannot grow the text
/// stay as they are.
fn register_replace(engine: &mut rhai::Engine, text_bytes_max: usize) {
    fn bounded(text: &mut ImmutableString, find: &str, with: &str, text_bytes_max: usize) -> Outcome<()> {
        // As the package's: an empty text stays as it is.
        if text.is_empty() {
            return Ok(());
        }
        if with.len() > find.len() {
            let grown = text.matches(find).count().saturating_mul(with.len() - find.len());
            if text.len().saturating_add(grown) > text_bytes_max {
                let what = "the text replace would make".to_owned();
                return Err(EvalAltResult::ErrorDataTooLarge(what, rhai::Position::NONE).into());
            }
        }
        *text = text.replace(find, with).into();
        Ok(())
    }
    // Not pure: it changes its string, so it is refused on a constant, as the package's is.
    let replace = FuncRegistration::new("replace").with_purity(false);
    replace.clone().register_into_engine(engine, move |text: &mut ImmutableString, find: &str, with: &str| {
        bounded(text, find, with, text_bytes_max)
    });
    replace.clone().register_into_engine(engine, move |text: &mut ImmutableString, find: char, with: &str| {
        bounded(text, find.encode_utf8(&mut [0; 4]), with, text_bytes_max)
    });
    replace.clone().register_into_engine(engine, move |text: &mut ImmutableString, find: &str, with: char| {
        bounded(text, find, with.encode_utf8(&mut [0; 4]), text_bytes_max)
    });
    replace.register_into_engine(engine, move |text: &mut ImmutableString, find: char, with: char| {
        bounded(text, find.encode_utf8(&mut [0; 4]), with.encode_utf8(&mut [0; 4]), text_bytes_max)
    });
}

/// `pad` of a text and of an array, as the packages have them, but what they would make is
/// measured before it is made: the text's would never end with an empty padding (it adds
/// nothing at each turn), and the array's multiplies the size of its item unchecked, which
/// overflows (`[].pad(4611686018427387904, [0, 0, 0])`).
fn register_pad(engine: &mut rhai::Engine, bounds: Bounds) {
    /// Pads `text` with `padding` to `length` characters (cut short in the last copy), if
    /// it has fewer.
    fn pad_text(text: &mut ImmutableString, length: INT, padding: &str, text_bytes_max: usize) -> Outcome<()> {
        let length = usize::try_from(length).unwrap_or(0);
        let characters = text.chars().count();
        if length <= characters {
            return Ok(());
        }
        if padding.is_empty() {
            let message = format!(
                "pad needs a non-empty padding to lengthen a text of {characters} characters to {length}: give \
                 it a text of at least one character"
            );
            return Err(EvalAltResult::ErrorRuntime(message.into(), rhai::Position::NONE).into());
        }
        let missing = length - characters;
        let padding_characters = padding.chars().count();
        let (copies, rest) = (missing / padding_characters, missing % padding_characters);
        let rest_bytes = padding.char_indices().nth(rest).map_or(padding.len(), |(at, _)| at);
        let padded_bytes = copies
            .checked_mul(padding.len())
            .and_then(|bytes| bytes.checked_add(rest_bytes))
            .and_then(|bytes| bytes.checked_add(text.len()))
            .filter(|bytes| *bytes <= text_bytes_max)
            .ok_or_else(|| too_large("the text pad would make"))?;
        let mut padded = String::with_capacity(padded_bytes);
        padded.push_str(text);
        (0..copies).for_each(|_| padded.push_str(padding));
        padded.push_str(&padding[..rest_bytes]);
        *text = padded.into();
        Ok(())
    }
    // Not pure: they change their value, so they are refused on a constant, as the
    // packages' are.
    let pad = FuncRegistration::new("pad").with_purity(false);
    pad.clone().register_into_engine(engine, move |text: &mut ImmutableString, length: INT, padding: &str| {
        pad_text(text, length, padding, bounds.text_bytes)
    });
    pad.clone().register_into_engine(engine, move |text: &mut ImmutableString, length: INT, padding: char| {
        pad_text(text, length, padding.encode_utf8(&mut [0; 4]), bounds.text_bytes)
    });
    pad.register_into_engine(engine, move |array: &mut Array, length: INT, item: Dynamic| -> Outcome<()> {
        let length = usize::try_from(length).unwrap_or(0);
        if length <= array.len() {
            return Ok(());
        }
        let copies = length - array.len();
        let mut made = Made::default();
        made.add_entries(array, VALUE_DEPTH_MAX, "pad")?;
        let mut one = Made::default();
        one.add(&item, VALUE_DEPTH_MAX, "pad")?;
        // Each copy is an entry, and holds what the item holds.
        let grown = |so_far: usize, each: usize| copies.checked_mul(each).and_then(|more| so_far.checked_add(more));
        let padded = Made {
            array_entries: grown(made.array_entries, one.array_entries.saturating_add(1)).unwrap_or(usize::MAX),
            map_entries: grown(made.map_entries, one.map_entries).unwrap_or(usize::MAX),
            text_bytes: grown(made.text_bytes, one.text_bytes).unwrap_or(usize::MAX),
            visited: 0,
        };
        padded.check(bounds, "array", "pad")?;
        array.resize(length, item);
        Ok(())
    });
}
