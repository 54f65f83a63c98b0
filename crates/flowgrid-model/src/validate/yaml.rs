//! A bound on what a YAML definition holds once its aliases are expanded. The parser
//! copies an anchored node for every alias (`*name`) that names it, so a text well under
//! the size limit can stand for gigabytes (one long string, named a hundred thousand
//! times). The text is read once without building anything, counting the bytes of its
//! scalars and one per node, and refused past the bound before it is parsed for real.

use std::cell::Cell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, MapAccess, SeqAccess, VariantAccess, Visitor,
};

use crate::error::{DefinitionError, Result};

/// Refuses `text` if its nodes, aliases expanded, hold more than `bytes_max`. Text that is
/// not YAML passes: the parse that follows says what is wrong with it.
pub(super) fn check_expansion(text: &str, bytes_max: usize) -> Result<()> {
    let spent = Cell::new(0);
    let counted = Budget { spent: &spent, max: bytes_max }.deserialize(serde_norway::Deserializer::from_str(text));
    if counted.is_err() && spent.get() > bytes_max {
        return Err(DefinitionError::Parse(format!(
            "YAML: the definition's aliases (`*name`) expand it past {bytes_max} bytes: write the values out, or use \
             fewer aliases"
        )));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Budget<'a> {
    spent: &'a Cell<usize>,
    max: usize,
}

impl Budget<'_> {
    fn spend<E: de::Error>(self, bytes: usize) -> std::result::Result<(), E> {
        self.spent.set(self.spent.get().saturating_add(bytes));
        if self.spent.get() > self.max {
            return Err(E::custom("over the expansion bound"));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Budget<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> std::result::Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budget<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<(), E> {
        self.spend(1)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<(), E> {
        self.spend(1)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<(), E> {
        self.spend(1)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<(), E> {
        self.spend(1)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> std::result::Result<(), E> {
        self.spend(value.len() + 1)
    }

    fn visit_bytes<E: de::Error>(self, value: &[u8]) -> std::result::Result<(), E> {
        self.spend(value.len() + 1)
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<(), E> {
        self.spend(1)
    }

    fn visit_none<E: de::Error>(self) -> std::result::Result<(), E> {
        self.spend(1)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> std::result::Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        self.spend(1)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        self.spend(1)?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }

    /// A tagged node (`!tag value`).
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> std::result::Result<(), A::Error> {
        let (IgnoredAny, variant) = data.variant()?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_that_expand_past_the_bound_are_refused_and_plain_text_passes() {
        let long = "A".repeat(1_000);
        let aliases = vec!["*x"; 200].join(", ");
        let bomb =
            format!("name: f\ndescription: &x \"{long}\"\nsteps:\n  - {{id: a, kind: succeed, after: [{aliases}]}}\n");
        let refused = check_expansion(&bomb, 2 * bomb.len()).unwrap_err().to_string();
        assert!(refused.contains("aliases") && refused.contains("expand"), "{refused}");
        // The same text without aliases, and a few aliases, pass.
        let plain = bomb.replace(&aliases, "b");
        assert!(check_expansion(&plain, 2 * plain.len()).is_ok());
        let few = format!("name: f\ndescription: &x \"{long}\"\nsteps:\n  - {{id: a, kind: succeed, after: [*x]}}\n");
        assert!(check_expansion(&few, 2 * few.len()).is_ok());
        // Text that is no YAML at all is left to the parse that follows.
        assert!(check_expansion("name: [unclosed", 100).is_ok());
    }
}
