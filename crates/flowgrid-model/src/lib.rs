//! The flowgrid data model: flow definitions as authors write them, the checks that
//! reject bad ones with located errors, the compiled [`FlowPlan`] the engine runs, the
//! sandboxed expression [`Evaluator`], and the identifiers shared by every crate.
//!
//! Invariants: this crate does no I/O, reads no clock and spawns nothing. A
//! [`FlowPlan`] only exists for a definition that passed [`validate`].

pub mod definition;
pub mod error;
pub mod expr;
pub mod ids;
pub mod input_schema;
pub mod labels;
pub mod limits;
pub mod plan;
pub mod schedule;
mod validate;

pub use definition::*;
pub use error::{DefinitionError, Issue, Result};
pub use expr::{Evaluator, Expr, ExprError, Prepared, Scope};
pub use ids::*;
pub use input_schema::InputSchema;
pub use labels::{check_labels, has_labels, Labels, ON_FAILURE_OF_LABEL};
pub use limits::Limits;
pub use plan::{
    FlowLoop, FlowPlan, PlanCache, PlanConcurrency, PlanOnFailure, PlanStep, PlanStepKind, StepIndex, SubflowSpec,
    WaitFor,
};
pub use validate::{check_new, is_name, parse_definition, validate, with_deploy_defaults};

/// For `#[serde(skip_serializing_if = "flowgrid_model::is_zero")]`: a count that is 0
/// (the default) is left out of the encoded record or message.
pub fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// `ms` since the Unix epoch as an RFC 3339 UTC time: to the second
/// (`2026-12-05T10:00:00Z`), or with `millis` to the millisecond (`...10:00:00.250Z`); a
/// value out of the calendar's range as `<ms> ms`.
pub fn utc_time(ms: Millis, millis: bool) -> String {
    let format = if millis { chrono::SecondsFormat::Millis } else { chrono::SecondsFormat::Secs };
    let moment = i64::try_from(ms).ok().and_then(chrono::DateTime::from_timestamp_millis);
    moment.map_or_else(|| format!("{ms} ms"), |moment| moment.to_rfc3339_opts(format, true))
}
