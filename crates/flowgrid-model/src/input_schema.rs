//! A flow's `input_schema`: the JSON Schema every run's input must match.
//!
//! Compiled once per flow version; checked where a start enters the grid (the API), so a
//! run that does not match is refused before anything is written. References are
//! resolved only inside the schema itself: nothing is fetched.

use std::fmt;

use serde_json::Value;

use crate::error::Issue;

/// Problems reported for one input, at most: the first ones say what to fix.
pub const ISSUES_MAX: usize = 10;

/// A compiled input schema.
pub struct InputSchema {
    validator: jsonschema::Validator,
}

impl InputSchema {
    /// Compiles `schema`; the error says what is wrong with it and where in the schema (the
    /// JSON pointer of the part at fault, such as `/properties/a/type`).
    pub fn compile(schema: &Value) -> Result<InputSchema, String> {
        use jsonschema::error::ValidationErrorKind::Referencing;
        use jsonschema::ReferencingError::Unretrievable;
        jsonschema::validator_for(schema).map(|validator| InputSchema { validator }).map_err(|error| {
            match error.kind() {
                // The library's own words would point at a resolver the grid does not offer.
                Referencing(Unretrievable { uri, .. }) => outside_ref(uri),
                // The schema is the value the meta-schema checks: the place at fault in it is
                // the error's instance path, which the library's own words leave out.
                _ => match error.instance_path().as_str() {
                    "" => format!("not a JSON Schema this grid can use: {error}"),
                    place => format!("not a JSON Schema this grid can use: at {place} in the schema, {error}"),
                },
            }
        })
    }

    /// The ways `input` does not match, each located under `root` (`input`, or
    /// `schedule.input`) by the JSON pointer of the value at fault; at most
    /// [`ISSUES_MAX`]. Empty when it matches.
    pub fn check(&self, input: &Value, root: &str) -> Vec<Issue> {
        if self.validator.is_valid(input) {
            return Vec::new();
        }
        self.validator
            .iter_errors(input)
            .take(ISSUES_MAX)
            .map(|error| Issue { path: format!("{root}{}", error.instance_path()), message: issue_message(&error) })
            .collect()
    }
}

impl fmt::Debug for InputSchema {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("InputSchema")
    }
}

/// An issue's message says the value at fault, unless it is long: a caller's large value
/// (written as JSON, several times its size with escapes) would make the refusal larger
/// than a reply may be. Then the value is left out (its path locates it), and what the
/// schema says is cut to [`ISSUE_MESSAGE_BYTES_MAX`].
fn issue_message(error: &jsonschema::ValidationError<'_>) -> String {
    let full = error.to_string();
    if full.len() <= ISSUE_MESSAGE_BYTES_MAX {
        return full;
    }
    let mut masked = error.masked().to_string();
    if masked.len() > ISSUE_MESSAGE_BYTES_MAX {
        let mut end = ISSUE_MESSAGE_BYTES_MAX;
        while !masked.is_char_boundary(end) {
            end -= 1;
        }
        masked.truncate(end);
        masked.push('…');
    }
    masked
}

/// The longest message of one issue (bytes, about): see [`issue_message`].
const ISSUE_MESSAGE_BYTES_MAX: usize = 512;

/// The refusal of a `$ref` to a document outside the schema, which the grid never fetches.
fn outside_ref(uri: &str) -> String {
    format!(
        "`$ref` {uri:?} is outside the schema, and nothing is fetched: copy what it names into the schema's `$defs` \
         and refer to it as `#/$defs/<name>`"
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A large value at fault is left out of its issue's message, which stays short; a
    /// small one is named.
    #[test]
    fn an_issue_names_a_small_value_and_leaves_a_large_one_out() {
        let schema = InputSchema::compile(&json!({"type": "array", "items": {"type": "integer"}})).expect("valid");
        let large = "\u{1}".repeat(100_000);
        let issues = schema.check(&json!([large, large, "seven"]), "input");
        assert_eq!(issues.len(), 3, "{issues:?}");
        assert!(issues.iter().all(|issue| issue.message.len() <= 1_024), "{issues:.300?}");
        assert_eq!(issues[0].path, "input/0");
        assert!(issues[0].message.contains("is not of type \"integer\""), "{:?}", issues[0]);
        assert_eq!(issues[2].message, r#""seven" is not of type "integer""#);
    }

    #[test]
    fn an_input_is_checked_against_the_schema_and_each_problem_is_located() {
        let schema = json!({
            "type": "object",
            "required": ["video", "segments"],
            "properties": {
                "video": {"type": "string", "minLength": 1},
                "segments": {"type": "array", "items": {"type": "object", "required": ["index"]}},
            },
        });
        let schema = InputSchema::compile(&schema).expect("a valid schema");
        assert!(schema.check(&json!({"video": "a.mp4", "segments": [{"index": 0}]}), "input").is_empty());
        let issues = schema.check(&json!({"video": 7, "segments": [{"index": 0}, {}]}), "input");
        let paths: Vec<&str> = issues.iter().map(|issue| issue.path.as_str()).collect();
        assert_eq!(paths, ["input/video", "input/segments/1"], "{issues:?}");
        assert_eq!(issues[0].message, "7 is not of type \"string\"", "{issues:?}");
        let issues = schema.check(&json!({}), "schedule.input");
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert!(issues.iter().all(|issue| issue.path == "schedule.input"), "{issues:?}");
        assert!(issues[0].message.contains("is a required property"), "{issues:?}");
    }

    #[test]
    fn a_bad_schema_or_a_remote_reference_is_refused() {
        let bad = InputSchema::compile(&json!({"type": "strnig"})).unwrap_err();
        assert!(bad.starts_with("not a JSON Schema this grid can use"), "{bad}");
        let remote = InputSchema::compile(&json!({"$ref": "https://example.com/order.json"})).unwrap_err();
        assert!(
            remote.contains("\"https://example.com/order.json\" is outside the schema, and nothing is fetched"),
            "{remote}"
        );
        let local = json!({"$defs": {"id": {"type": "integer"}}, "properties": {"id": {"$ref": "#/$defs/id"}}});
        let local = InputSchema::compile(&local).expect("a reference inside the schema");
        assert_eq!(local.check(&json!({"id": "x"}), "input")[0].path, "input/id");
    }

    /// The library's own words leave out where in the schema the mistake is: a schema of
    /// many properties would leave its author looking for it.
    #[test]
    fn a_bad_schema_is_refused_naming_the_place_in_it() {
        let bad = InputSchema::compile(&json!({"properties": {"a": {"type": "strnig"}}})).unwrap_err();
        assert!(bad.starts_with("not a JSON Schema this grid can use"), "{bad}");
        assert!(bad.contains("/properties/a/type"), "{bad}");
    }

    #[test]
    fn many_problems_are_cut_to_the_first_ones() {
        let schema = InputSchema::compile(&json!({"type": "array", "items": {"type": "integer"}})).unwrap();
        let input = Value::Array((0..50).map(|n| json!(format!("{n}"))).collect());
        assert_eq!(schema.check(&input, "input").len(), ISSUES_MAX);
    }
}
