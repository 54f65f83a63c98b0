//! Labels: `key=value` pairs a run is started with, to find it again (`run list --label
//! customer=acme`). They are the caller's; the grid only keeps, shows and filters them.

use std::collections::BTreeMap;

/// A run's labels, by key.
pub type Labels = BTreeMap<String, String>;

/// Reads labels as `Labels` does, refusing a key given twice (`{"a": "1", "a": "2"}`), which
/// a map would take silently, keeping one of the values. For `#[serde(deserialize_with)]`.
pub fn deserialize_once<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Labels, D::Error> {
    struct Once;
    impl<'de> serde::de::Visitor<'de> for Once {
        type Value = Labels;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a map of label keys to string values")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
            let mut labels = Labels::new();
            while let Some((key, value)) = map.next_entry::<String, String>()? {
                if labels.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("label `{key}` is given twice: give each key once")));
                }
                labels.insert(key, value);
            }
            Ok(labels)
        }
    }
    deserializer.deserialize_map(Once)
}

/// The label the grid gives a failure handler's run: the id of the run whose failure
/// started it. A run with it starts no failure handler of its own, so two flows that
/// handle each other's failures cannot start each other forever.
pub const ON_FAILURE_OF_LABEL: &str = "flowgrid.on_failure_of";

/// Labels one run may have.
pub const LABELS_MAX: usize = 16;
/// Bytes of one label's key.
pub const LABEL_KEY_BYTES_MAX: usize = 64;
/// Bytes of one label's value.
pub const LABEL_VALUE_BYTES_MAX: usize = 256;

/// Why `labels` cannot be a run's, if they cannot: too many, a key that is not 1 to 64
/// characters of `A-Z a-z 0-9 _ - . /`, or a value over 256 bytes.
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > LABELS_MAX {
        return Err(format!("{} labels; a run has at most {LABELS_MAX}", labels.len()));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= LABEL_KEY_BYTES_MAX
            && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
        if !key_ok {
            return Err(format!(
                "label key {key:?}: use 1 to {LABEL_KEY_BYTES_MAX} characters of A-Z, a-z, 0-9, `_`, `-`, `.` and `/`"
            ));
        }
        if value.len() > LABEL_VALUE_BYTES_MAX {
            return Err(format!("label {key}: its value is {} bytes; at most {LABEL_VALUE_BYTES_MAX}", value.len()));
        }
    }
    Ok(())
}

/// Whether `labels` has every label of `wanted`.
pub fn has_labels(labels: Option<&Labels>, wanted: &Labels) -> bool {
    wanted.iter().all(|(key, value)| labels.and_then(|labels| labels.get(key)) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()
    }

    #[test]
    fn a_key_given_twice_is_refused_where_a_map_would_keep_one_value() {
        #[derive(Debug, serde::Deserialize)]
        struct Start {
            #[serde(default, deserialize_with = "deserialize_once")]
            labels: Labels,
        }
        let start: Start = serde_json::from_str(r#"{"labels": {"a": "1", "b": "2"}}"#).unwrap();
        assert_eq!(start.labels, labels(&[("a", "1"), ("b", "2")]));
        assert!(serde_json::from_str::<Start>("{}").unwrap().labels.is_empty());
        let error = serde_json::from_str::<Start>(r#"{"labels": {"a": "1", "a": "2"}}"#).unwrap_err().to_string();
        assert!(error.contains("label `a` is given twice"), "{error}");
    }

    #[test]
    fn labels_are_bounded_and_keys_are_plain() {
        assert!(check_labels(&labels(&[("customer", "acme"), ("team/x.y-z_1", "")])).is_ok());
        assert!(check_labels(&labels(&[("", "a")])).unwrap_err().contains("label key"));
        assert!(check_labels(&labels(&[("has space", "a")])).is_err());
        assert!(check_labels(&labels(&[("k", &"v".repeat(257))])).unwrap_err().contains("257 bytes"));
        let many: Labels = (0..17).map(|n| (format!("k{n}"), String::new())).collect();
        assert!(check_labels(&many).unwrap_err().contains("17 labels"));
    }

    #[test]
    fn a_filter_matches_runs_with_all_its_labels() {
        let run = labels(&[("customer", "acme"), ("tier", "gold")]);
        assert!(has_labels(Some(&run), &labels(&[("customer", "acme")])));
        assert!(has_labels(Some(&run), &Labels::new()));
        assert!(!has_labels(Some(&run), &labels(&[("customer", "acme"), ("tier", "silver")])));
        assert!(!has_labels(None, &labels(&[("customer", "acme")])));
        assert!(has_labels(None, &Labels::new()));
    }
}
