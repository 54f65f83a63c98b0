//! Field rules: names, sizes, retry policies, timeouts, priorities and per-kind settings.

use crate::definition::{
    Catch, Concurrency, FlowDefinition, Repeat, RetryPolicy, Schedule, Step, SubflowStep, TaskCache, Trigger, WaitStep,
    WhenFull, REPEAT_ITERATIONS_DEFAULT, REPEAT_ITERATIONS_MAX,
};
use crate::error::Issue;
use crate::input_schema::InputSchema;
use crate::limits::{
    Limits, CACHE_TTL_MS_MAX, CHILDREN_GOING_MAX, CONCURRENCY_MAX, DURATION_MS_MAX, MAP_ITEMS_GOING_MAX,
};
use crate::plan::{PRIORITY_MAX, WAIT_MS_MAX};
use crate::schedule::{Timetable, EVERY_MS_MAX, EVERY_MS_MIN};

use super::{push_issue, step_path};

/// Attempts a retry policy may ask for: more is a loop, not a retry.
const ATTEMPTS_MAX: u32 = 100;
/// Rules of one step's `catch`, and of one choice's `choices`: each is an edge of the
/// graph, and a rule lists as many codes (or conditions) as it needs.
pub(crate) const RULES_MAX: usize = 100;

/// A limit bounds runs at once, their start rate, or both, within [`CONCURRENCY_MAX`].
fn check_concurrency(concurrency: &Concurrency, issues: &mut Vec<Issue>) {
    if concurrency.max.is_none() && concurrency.rate.is_none() {
        push_issue(
            issues,
            "concurrency",
            "give `max` (runs at once), `rate` (runs started per period) or both".to_owned(),
        );
    }
    if let Some(max) = concurrency.max.filter(|max| !(1..=CONCURRENCY_MAX).contains(max)) {
        push_issue(issues, "concurrency.max", format!("must be 1 to {CONCURRENCY_MAX}, it is {max}"));
    }
    if let Some(rate) = &concurrency.rate {
        if !(1..=CONCURRENCY_MAX).contains(&rate.runs) {
            push_issue(issues, "concurrency.rate.runs", format!("must be 1 to {CONCURRENCY_MAX}, it is {}", rate.runs));
        }
        if !(1..=DURATION_MS_MAX).contains(&rate.per_ms) {
            push_issue(
                issues,
                "concurrency.rate.per_ms",
                format!("must be 1 ms to {DURATION_MS_MAX} ms (366 days), it is {}", rate.per_ms),
            );
        }
    }
    if concurrency.when_full == WhenFull::CancelOldest && concurrency.max.is_none() {
        push_issue(
            issues,
            "concurrency.when_full",
            "cancel_oldest makes room for a new run under `max`: give `max`, or use cancel_new or queue with a rate alone",
        );
    }
}

/// Checks every field that can be judged on its own (no edges, no expressions).
pub(super) fn check_fields(definition: &FlowDefinition, limits: &Limits, issues: &mut Vec<Issue>) {
    check_name("name", "flow name", &definition.name, limits, issues);
    check_timeout("timeout_ms", definition.timeout_ms, issues);
    if let Some(concurrency) = &definition.concurrency {
        check_concurrency(concurrency, issues);
    }
    if let Some(schema) = &definition.input_schema {
        match InputSchema::compile(schema) {
            Err(message) => push_issue(issues, "input_schema", message),
            // The runs a schedule starts would all be refused.
            Ok(schema) => {
                if let Some(schedule) = &definition.schedule {
                    issues.extend(schema.check(&schedule.input, "schedule.input"));
                }
            }
        }
    }
    if let Some(trigger) = &definition.trigger {
        check_trigger(trigger, issues);
    }
    if let Some(on_failure) = &definition.on_failure {
        check_name("on_failure.flow", "flow name", &on_failure.flow, limits, issues);
        if on_failure.flow == definition.name {
            push_issue(
                issues,
                "on_failure.flow",
                "names this flow: a failure handler is another flow (a handler's run starts no handler of its own)",
            );
        }
        if on_failure.statuses.is_empty() {
            push_issue(
                issues,
                "on_failure.statuses",
                "is empty: name the ends that start the handler (failed, timed_out, cancelled), or leave it out for \
                 failed and timed_out",
            );
        }
    }
    if let Some(schedule) = &definition.schedule {
        check_schedule(schedule, limits, issues);
    }
    if definition.steps.is_empty() {
        push_issue(issues, "steps", "a flow needs at least one step: add a step");
    }
    if definition.steps.len() > limits.steps_max {
        push_issue(
            issues,
            "steps",
            format!(
                "the flow has {} steps, over the limit of {}: split it into smaller flows",
                definition.steps.len(),
                limits.steps_max
            ),
        );
    }
    for (position, step) in definition.steps.iter().enumerate() {
        check_step(&step_path(position, step.id()), step, limits, issues);
    }
}

fn check_step(path: &str, step: &Step, limits: &Limits, issues: &mut Vec<Issue>) {
    check_step_id(&format!("{path}.id"), step.id(), limits, issues);
    match step {
        Step::Task(task) => {
            check_name(&format!("{path}.pool"), "pool name", &task.pool, limits, issues);
            check_name(&format!("{path}.task"), "task name", &task.task, limits, issues);
            check_worker_settings(path, &task.retry, task.timeout_ms, task.priority, &task.catch, issues);
            check_timeout(&format!("{path}.total_timeout_ms"), task.total_timeout_ms, issues);
            check_cache(path, task.cache.as_ref(), issues);
        }
        Step::Map(map) => {
            check_name(&format!("{path}.pool"), "pool name", &map.pool, limits, issues);
            check_name(&format!("{path}.task"), "task name", &map.task, limits, issues);
            check_worker_settings(path, &map.retry, map.timeout_ms, map.priority, &map.catch, issues);
            check_timeout(&format!("{path}.total_timeout_ms"), map.total_timeout_ms, issues);
            check_cache(path, map.cache.as_ref(), issues);
            check_max_concurrency(path, map.max_concurrency, "items in flight", MAP_ITEMS_GOING_MAX, issues);
        }
        Step::Choice(choice) => {
            if choice.choices.is_empty() {
                push_issue(
                    issues,
                    format!("{path}.choices"),
                    "a choice needs at least one rule (`when` and `next`): add one, or use `after` for an unconditional edge",
                );
            }
            if choice.choices.len() > RULES_MAX {
                push_issue(
                    issues,
                    format!("{path}.choices"),
                    format!(
                        "has {} rules: at most {RULES_MAX} (a rule's `when` may test several things)",
                        choice.choices.len()
                    ),
                );
            }
        }
        Step::Fail(fail) => {
            if fail.error.trim().is_empty() {
                push_issue(
                    issues,
                    format!("{path}.error"),
                    "must not be empty: give the error code the run fails with",
                );
            }
        }
        Step::Wait(wait) => check_wait(path, wait, issues),
        Step::Signal(signal) => {
            check_timeout(&format!("{path}.timeout_ms"), signal.timeout_ms, issues);
            check_catch(path, &signal.catch, issues);
        }
        Step::Subflow(subflow) => {
            check_name(&format!("{path}.flow"), "flow name", &subflow.flow, limits, issues);
            check_timeout(&format!("{path}.timeout_ms"), subflow.timeout_ms, issues);
            if subflow.version == Some(0) {
                push_issue(
                    issues,
                    format!("{path}.version"),
                    "versions start at 1: name a deployed version, or leave it out for the latest",
                );
            }
            check_max_concurrency(path, subflow.max_concurrency, "child runs going", CHILDREN_GOING_MAX, issues);
            if subflow.items.is_none() && (subflow.max_concurrency.is_some() || subflow.tolerated_failures > 0) {
                push_issue(
                    issues,
                    path,
                    "max_concurrency and tolerated_failures apply to one child per item: add `items`, or remove them",
                );
            }
            if let Some(repeat) = &subflow.repeat {
                check_repeat(path, subflow, repeat, issues);
            }
            check_catch(path, &subflow.catch, issues);
        }
        Step::Transform(_) | Step::Succeed(_) => {}
    }
}

/// A loop runs one child at a time, at most `REPEAT_ITERATIONS_MAX` of them.
fn check_repeat(path: &str, subflow: &SubflowStep, repeat: &Repeat, issues: &mut Vec<Issue>) {
    if subflow.items.is_some() {
        push_issue(
            issues,
            format!("{path}.repeat"),
            "a loop runs one child at a time: use `items` or `repeat`, not both",
        );
    }
    if let Some(max_iterations) = repeat.max_iterations.filter(|max| !(1..=REPEAT_ITERATIONS_MAX).contains(max)) {
        push_issue(
            issues,
            format!("{path}.repeat.max_iterations"),
            format!("{max_iterations} is out of range: give 1 to {REPEAT_ITERATIONS_MAX} (default {REPEAT_ITERATIONS_DEFAULT})"),
        );
    }
}

/// A trigger names a stream as JetStream spells stream names, and a subject of non-empty
/// tokens.
fn check_trigger(trigger: &Trigger, issues: &mut Vec<Issue>) {
    if let Err(message) = crate::check_labels(&trigger.labels) {
        push_issue(issues, "trigger.labels", message);
    }
    let stream = &trigger.stream;
    let bad_stream = stream.is_empty()
        || stream.len() > 255
        || stream.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'));
    if bad_stream {
        push_issue(
            issues,
            "trigger.stream",
            format!(
                "{stream:?} is not a stream name: use 1 to 255 characters without spaces, `.`, `*`, `>`, `/` or `\\`"
            ),
        );
    }
    if let Some(subject) = &trigger.subject {
        let tokens: Vec<&str> = subject.split('.').collect();
        let bad_token = tokens.iter().enumerate().any(|(position, token)| {
            token.is_empty()
                || token.chars().any(char::is_whitespace)
                || (token.contains(['*', '>']) && token.len() > 1)
                || (*token == ">" && position + 1 != tokens.len())
        });
        if bad_token {
            push_issue(
                issues,
                "trigger.subject",
                format!(
                    "{subject:?} is not a subject: use tokens separated by `.`, each non-empty and without spaces, `*` \
                     for one token, `>` only at the end"
                ),
            );
        }
    }
}

/// A schedule has exactly one timetable, one that parses and is not too short, and an
/// input a run may take.
fn check_schedule(schedule: &Schedule, limits: &Limits, issues: &mut Vec<Issue>) {
    if let Err(message) = crate::check_labels(&schedule.labels) {
        push_issue(issues, "schedule.labels", message);
    }
    match (schedule.every_ms, &schedule.cron) {
        (None, None) => push_issue(
            issues,
            "schedule",
            "a schedule needs `every_ms` (a period) or `cron` (an expression, in UTC or its `timezone`): add one",
        ),
        (Some(_), Some(_)) => {
            push_issue(issues, "schedule", "a schedule takes `every_ms` or `cron`, not both: keep one")
        }
        _ => {}
    }
    // Each field is checked on its own as well, so that every mistake is told at once.
    if let Some(every_ms) = schedule.every_ms.filter(|every_ms| !(EVERY_MS_MIN..=EVERY_MS_MAX).contains(every_ms)) {
        push_issue(
            issues,
            "schedule.every_ms",
            format!("is {every_ms}: use {EVERY_MS_MIN} ms (a second) to {EVERY_MS_MAX} ms (366 days)"),
        );
    }
    let zone = match schedule.timezone.as_deref().map_or(Ok(chrono_tz::Tz::UTC), Timetable::zone) {
        Ok(zone) => zone,
        Err(message) => {
            push_issue(issues, "schedule.timezone", message);
            chrono_tz::Tz::UTC
        }
    };
    if let Some(cron) = &schedule.cron {
        if let Err(error) = Timetable::cron_in(cron, zone) {
            push_issue(
                issues,
                "schedule.cron",
                format!(
                    "`{cron}` is not a cron expression ({error}): write 5 fields, minute (0-59) hour (0-23) \
                     day-of-month (1-31) month (1-12) day-of-week (0-7, Sunday is 0 or 7), e.g. `0 */6 * * *`"
                ),
            );
        }
    }
    if schedule.timezone.is_some() && schedule.cron.is_none() {
        push_issue(issues, "schedule.timezone", "goes with `cron`: `every_ms` counts from the Unix epoch".to_owned());
    }
    let depth = crate::limits::nesting_depth(&schedule.input);
    if depth > limits.nesting_depth_max {
        push_issue(
            issues,
            "schedule.input",
            format!("is nested {depth} levels deep, over the limit of {}", limits.nesting_depth_max),
        );
    }
    let bytes = crate::limits::json_bytes(&schedule.input);
    if bytes > limits.payload_bytes_max {
        push_issue(
            issues,
            "schedule.input",
            format!("is {bytes} bytes, over the limit of {}: pass a reference to large data", limits.payload_bytes_max),
        );
    }
}

/// A wait says how long in exactly one way, and a fixed wait is at most [`WAIT_MS_MAX`].
fn check_wait(path: &str, wait: &WaitStep, issues: &mut Vec<Issue>) {
    let given = [wait.duration_ms.is_some(), wait.duration.is_some(), wait.until.is_some()];
    match given.iter().filter(|given| **given).count() {
        0 => push_issue(
            issues,
            path,
            "a wait needs `duration_ms` (milliseconds), `duration` (an expression giving milliseconds) or `until` \
             (an expression giving a time): add one",
        ),
        1 => {}
        _ => push_issue(
            issues,
            path,
            "a wait takes one of `duration_ms`, `duration` and `until`: keep the fixed time or one expression",
        ),
    }
    if let Some(duration_ms) = wait.duration_ms.filter(|duration_ms| *duration_ms > WAIT_MS_MAX) {
        push_issue(
            issues,
            format!("{path}.duration_ms"),
            format!("is {duration_ms} ms, over the longest wait of {WAIT_MS_MAX} ms (366 days): wait less"),
        );
    }
}

fn check_worker_settings(
    path: &str,
    retry: &RetryPolicy,
    timeout_ms: Option<u64>,
    priority: Option<u8>,
    catch: &[Catch],
    issues: &mut Vec<Issue>,
) {
    check_retry(&format!("{path}.retry"), retry, issues);
    check_timeout(&format!("{path}.timeout_ms"), timeout_ms, issues);
    if let Some(priority) = priority.filter(|&priority| priority > PRIORITY_MAX) {
        push_issue(
            issues,
            format!("{path}.priority"),
            format!("is {priority}: use a priority from 0 to {PRIORITY_MAX} (higher runs first)"),
        );
    }
    check_catch(path, catch, issues);
}

/// A fan-out's bound on `what` at once is at least 1 when it is set; left out, it is
/// `default` (which a deploy writes into a map step's stored definition).
fn check_max_concurrency(path: &str, max_concurrency: Option<u32>, what: &str, default: u32, issues: &mut Vec<Issue>) {
    if max_concurrency == Some(0) {
        push_issue(
            issues,
            format!("{path}.max_concurrency"),
            format!(
                "must be at least 1: set the number of {what} at once, or leave it out for the default of {default}"
            ),
        );
    }
}

fn check_catch(path: &str, catch: &[Catch], issues: &mut Vec<Issue>) {
    if catch.len() > RULES_MAX {
        push_issue(
            issues,
            format!("{path}.catch"),
            format!("has {} rules: at most {RULES_MAX} (one rule's `errors` may list many codes)", catch.len()),
        );
    }
    for (rule, catch_rule) in catch.iter().enumerate() {
        if catch_rule.errors.is_empty() || catch_rule.errors.iter().any(|code| code.trim().is_empty()) {
            push_issue(
                issues,
                format!("{path}.catch[{rule}].errors"),
                "must list error codes, none empty: name the codes to handle, or `*` for all",
            );
        }
    }
}

fn check_retry(path: &str, retry: &RetryPolicy, issues: &mut Vec<Issue>) {
    if retry.max_attempts < 1 || retry.max_attempts > ATTEMPTS_MAX {
        push_issue(
            issues,
            format!("{path}.max_attempts"),
            format!("is {}: use 1 to {ATTEMPTS_MAX} attempts in all (1 means no retry)", retry.max_attempts),
        );
    }
    if !(retry.backoff_multiplier.is_finite() && retry.backoff_multiplier >= 1.0) {
        push_issue(
            issues,
            format!("{path}.backoff_multiplier"),
            format!("is {}: use a number of at least 1 (1 keeps the delay constant)", retry.backoff_multiplier),
        );
    }
    if !(0.0..=1.0).contains(&retry.jitter) {
        push_issue(
            issues,
            format!("{path}.jitter"),
            format!("is {}: use a fraction from 0 to 1 (0.2 = up to 20% shorter)", retry.jitter),
        );
    }
    if retry.max_backoff_ms < retry.initial_backoff_ms {
        push_issue(
            issues,
            format!("{path}.max_backoff_ms"),
            format!(
                "is {} ms, below initial_backoff_ms ({} ms): raise max_backoff_ms or lower initial_backoff_ms",
                retry.max_backoff_ms, retry.initial_backoff_ms
            ),
        );
    }
    if retry.retry_on.iter().any(|code| code.trim().is_empty()) {
        push_issue(
            issues,
            format!("{path}.retry_on"),
            "holds an empty error code: remove it, or use `*` for all codes",
        );
    }
}

fn check_cache(path: &str, cache: Option<&TaskCache>, issues: &mut Vec<Issue>) {
    let Some(cache) = cache else { return };
    if cache.ttl_ms == 0 || cache.ttl_ms > CACHE_TTL_MS_MAX {
        push_issue(
            issues,
            format!("{path}.cache.ttl_ms"),
            format!(
                "is {} ms: give how long a stored result is reused, from 1 ms to {CACHE_TTL_MS_MAX} (30 days)",
                cache.ttl_ms
            ),
        );
    }
}

fn check_timeout(path: &str, timeout_ms: Option<u64>, issues: &mut Vec<Issue>) {
    if timeout_ms == Some(0) {
        push_issue(issues, path, "must be greater than 0 ms: set a positive timeout, or leave it out for the default");
    }
}

/// Names end up in NATS subjects and keys: letters, digits, `-` and `_` only.
fn check_name(path: &str, what: &str, name: &str, limits: &Limits, issues: &mut Vec<Issue>) {
    if name.is_empty() {
        push_issue(issues, path, format!("the {what} must not be empty: use letters, digits, `-` and `_`"));
        return;
    }
    check_length(path, what, name, limits, issues);
    if let Some(bad) = name.chars().find(|&character| !is_name_character(character)) {
        push_issue(
            issues,
            path,
            format!("the {what} `{name}` contains {bad:?}: use only letters, digits, `-` and `_` (no dots, spaces or wildcards)"),
        );
    }
}

/// Step ids are read in expressions as `steps.<id>`, so they must be identifiers:
/// a letter or `_`, then letters, digits and `_`, and not a keyword of the expression language.
fn check_step_id(path: &str, id: &str, limits: &Limits, issues: &mut Vec<Issue>) {
    if id.is_empty() {
        push_issue(issues, path, "the step id must not be empty: use letters, digits and `_`".to_owned());
        return;
    }
    if !check_length(path, "step id", id, limits, issues) {
        return;
    }
    if !is_identifier(id) {
        // The id with every other character as `_`, and a letter first.
        let mut suggestion: String =
            id.chars().map(|character| if character.is_ascii_alphanumeric() { character } else { '_' }).collect();
        if !suggestion.starts_with(|first: char| first.is_ascii_alphabetic()) {
            suggestion.insert_str(0, "step_");
        }
        push_issue(
            issues,
            path,
            format!(
                "the step id `{id}` is not an identifier, so expressions cannot read it as `steps.{id}`: start with a \
                 letter or `_` and use only ASCII letters, digits and `_` (e.g. `{suggestion}`)"
            ),
        );
    } else if is_expression_keyword(id) {
        push_issue(
            issues,
            path,
            format!("the step id `{id}` is a keyword of the expression language: choose another id"),
        );
    }
}

/// Whether `id` is an identifier of the expression language: an ASCII letter or `_`, then
/// ASCII letters, digits and `_`.
fn is_identifier(id: &str) -> bool {
    let starts_well = id.chars().next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_');
    starts_well && id.chars().all(|character| character.is_ascii_alphanumeric() || character == '_')
}

/// Refuses a name over the length limit; `true` when it is within it.
fn check_length(path: &str, what: &str, name: &str, limits: &Limits, issues: &mut Vec<Issue>) -> bool {
    if name.len() <= limits.name_bytes_max {
        return true;
    }
    push_issue(
        issues,
        path,
        format!("the {what} is {} bytes, over the limit of {}: shorten it", name.len(), limits.name_bytes_max),
    );
    false
}

/// Reserved words of the expression language (Rhai) that cannot follow `steps.`.
fn is_expression_keyword(id: &str) -> bool {
    const KEYWORDS: [&str; 36] = [
        "true",
        "false",
        "let",
        "const",
        "if",
        "else",
        "switch",
        "do",
        "while",
        "until",
        "loop",
        "for",
        "in",
        "continue",
        "break",
        "return",
        "throw",
        "try",
        "catch",
        "fn",
        "private",
        "import",
        "export",
        "as",
        "global",
        "Fn",
        "call",
        "curry",
        "this",
        "type_of",
        "print",
        "debug",
        "eval",
        "is_def_var",
        "is_def_fn",
        "is_shared",
    ];
    KEYWORDS.contains(&id)
}

fn is_name_character(character: char) -> bool {
    character.is_ascii_alphanumeric() || character == '-' || character == '_'
}

/// Whether `name` can name a flow, a pool or a task: one subject token of letters,
/// digits, `-` and `_` (the rule `check_name` applies, without its length bound).
pub fn is_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(is_name_character)
}
