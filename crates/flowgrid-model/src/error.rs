//! Definition errors: every problem found, each located by a path into the definition.

use serde::{Deserialize, Serialize};

pub type Result<T, E = DefinitionError> = std::result::Result<T, E>;

/// One problem in a definition, located by a path such as `steps[2](resize).retry.max_attempts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a definition was refused. Fix the definition and deploy again.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The text is not valid YAML/JSON or does not fit the definition model; the message
    /// carries the line and column.
    #[error("cannot parse the definition: {0}")]
    Parse(String),
    /// The definition parsed but breaks one or more rules; every issue is listed.
    #[error("invalid definition ({} problem{}): {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|issue| issue.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Issue>),
}

impl DefinitionError {
    /// The located issues (a parse error is one issue at path `definition`).
    pub fn issues(&self) -> Vec<Issue> {
        match self {
            DefinitionError::Parse(message) => vec![Issue { path: "definition".to_owned(), message: message.clone() }],
            DefinitionError::Invalid(issues) => issues.clone(),
        }
    }
}
