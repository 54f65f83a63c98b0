//! The UI's pages. Every value from the grid goes through maud, which escapes it.

use std::collections::HashMap;

use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde_json::Value;

use flowgrid_engine::{RunStatus, RunView, StepStatus, StepView};
use flowgrid_model::{AttemptId, FlowDefinition, Issue, Millis, ParentRef, RunId, Step};
use flowgrid_proto::{FlowInfo, FlowList, LimitList, LiveOutput, RunHistory, RunList, RunStarted, RunSummary};

use super::dag::Layout;
use crate::output::{self, duration_ms, item_counts, now_ms, span, utc_time, utc_time_ms};

/// Seconds between reloads of a page that shows something still going.
const REFRESH_S: u32 = 2;
/// Earlier versions a flow's page links, the newest of them: a flow deployed tens of
/// thousands of times still has a small page (a form shows any other version).
const VERSIONS_LINKED: u32 = 20;

const STYLE: &str = r#"
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 10px 24px; display: flex; gap: 24px; align-items: baseline; }
header a { color: #cdd6e6; text-decoration: none; } header a:hover { color: #fff; }
header .brand { font-weight: 700; color: #fff; font-size: 16px; }
main { padding: 16px 24px; max-width: 1280px; }
h1 { font-size: 20px; margin: 8px 0 12px; } h2 { font-size: 16px; margin: 20px 0 8px; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid #e3e6eb; vertical-align: top; }
th { background: #eef0f4; font-weight: 600; }
pre { background: #fff; border: 1px solid #e3e6eb; padding: 10px; overflow: auto; max-height: 480px; }
.status { font-weight: 600; } .succeeded { color: #1e7a38; } .failed, .timed_out { color: #b3261e; }
.running, .retrying { color: #1f5fbf; } .cancelled, .skipped, .pending { color: #6b7280; } .paused, .queued, .delayed { color: #a15c00; }
.notice { background: #fff8e1; border: 1px solid #f0d48a; padding: 8px 12px; margin: 8px 0; }
.error { background: #fdecea; border: 1px solid #f3b4ae; padding: 8px 12px; margin: 8px 0; }
.muted { color: #6b7280; } form.filter { margin: 8px 0 12px; display: flex; gap: 8px; align-items: center; }
form.action { margin: 8px 0; display: flex; gap: 8px; align-items: flex-end; flex-wrap: wrap; }
form.action textarea { font: 13px/1.4 ui-monospace, monospace; min-width: 420px; }
form.action textarea.wide { width: 100%; box-sizing: border-box; }
.bar { position: relative; height: 12px; background: #eef0f4; min-width: 160px; }
.bar span { position: absolute; top: 0; height: 12px; background: #7aa7e6; min-width: 2px; }
svg.dag { background: #fff; border: 1px solid #e3e6eb; max-width: 100%; height: auto; }
svg .node rect { fill: #fff; stroke: #8a93a6; } svg .node text { font-size: 12px; fill: #1d2330; }
svg .node .step-kind { fill: #6b7280; font-size: 11px; }
svg .node.succeeded rect { fill: #dff3e4; stroke: #1e7a38; } svg .node.failed rect { fill: #fbe1df; stroke: #b3261e; }
svg .node.running rect, svg .node.retrying rect { fill: #dce8fb; stroke: #1f5fbf; stroke-width: 2; }
svg .node.skipped rect, svg .node.cancelled rect { fill: #f0f1f3; stroke: #b9bec8; stroke-dasharray: 4 3; }
svg .edge { fill: none; stroke: #8a93a6; stroke-width: 1.4; } svg .edge.branch { stroke-dasharray: 5 3; }
svg .edge-label { font-size: 10px; fill: #6b7280; }
"#;

/// The frame of every page; `refresh` reloads it every [`REFRESH_S`] seconds.
fn layout(title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if refresh { meta http-equiv="refresh" content=(REFRESH_S); }
                title { (title) " · flowgrid" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    a.brand href="/" { "flowgrid" }
                    a href="/" { "Overview" }
                    a href="/runs" { "Runs" }
                }
                main { (body) }
            }
        }
    }
}

/// The optional reason field of a form that pauses, resumes, cancels or redrives; the
/// reason goes into the run's (or flow's) history, which keeps at most
/// [`REASON_BYTES_MAX`](flowgrid_model::limits::REASON_BYTES_MAX) of it.
fn reason_input() -> Markup {
    let most = flowgrid_model::limits::REASON_BYTES_MAX;
    html! { " " input name="reason" size="32" maxlength=(most) placeholder="reason (optional)"; }
}

fn status_badge(status: &str) -> Markup {
    html! { span class=(format!("status {status}")) { (status) } }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// The most bytes of one value (an input, an output) a run's page shows: a page that
/// reloads every 2 s stays small with 1 MiB values.
const VALUE_BYTES_SHOWN: usize = 64 * 1024;

/// A run's value as its page shows it: pretty, cut after [`VALUE_BYTES_SHOWN`] with a note
/// on where the whole value is.
fn pretty_cut(value: &Value, run_id: &RunId) -> String {
    let text = pretty(value);
    if text.len() <= VALUE_BYTES_SHOWN {
        return text;
    }
    let cut = (0..=VALUE_BYTES_SHOWN).rev().find(|&at| text.is_char_boundary(at)).unwrap_or(0);
    format!(
        "{}\n… cut here: {} bytes in all (`flowgrid --json run get {run_id}` or GET /api/runs/{run_id} has it whole)",
        &text[..cut],
        text.len()
    )
}

fn runs_table(runs: &[RunSummary]) -> Markup {
    html! {
        table {
            tr { th { "Run" } th { "Flow" } th { "Status" } th { "Created (UTC)" } th { "Duration" } }
            @for run in runs {
                tr {
                    td { a href=(format!("/runs/{}", run.run_id)) { code { (run.run_id) } } }
                    td { a href=(format!("/flows/{}?version={}", run.flow, run.version)) { (run.flow) "@" (run.version) } }
                    td {
                        (status_badge(run.status.as_str()))
                        @if run.paused { " " (status_badge("paused")) }
                        @if run.queued { " " (status_badge("queued")) }
                        @if run.delayed { " " (status_badge("delayed")) }
                    }
                    td { (utc_time(run.created_ms)) }
                    td {
                        @match run.ended_ms {
                            Some(_) => (span(Some(run.created_ms), run.ended_ms)),
                            None => { (duration_ms(now_ms().saturating_sub(run.created_ms))) " so far" }
                        }
                    }
                }
            }
        }
    }
}

fn unavailable(what: &str, error: &str) -> Markup {
    html! { div.error { "Cannot read " (what) ": " (error) } }
}

/// The form that deploys a definition (`flowgrid ui --actions`).
pub fn deploy(token: &str) -> Markup {
    layout(
        "Deploy a flow",
        false,
        html! {
            h1 { "Deploy a flow" }
            p.muted { "A definition in YAML or JSON (see docs/flows.md); an existing name gets a new version." }
            form.action method="post" action="/flows" {
                input type="hidden" name="token" value=(token);
                textarea.wide name="definition" rows="18" placeholder="name: my-flow\nsteps:\n  - { id: first, kind: task, pool: tests, task: echo }" {}
                button type="submit" { "Deploy" }
            }
        },
    )
}

pub fn overview(
    status: &str,
    flows: &Result<FlowList, String>,
    recent: &Result<Vec<RunSummary>, String>,
    limits: &Result<LimitList, String>,
    actions: Option<&str>,
) -> Markup {
    layout(
        "Overview",
        true,
        html! {
            h1 { "Grid" }
            pre { (status) }
            h2 { "Flows" }
            @match flows {
                Err(error) => (unavailable("the flows", error)),
                Ok(list) if list.flows.is_empty() && list.next_cursor.is_none() => p.muted { "No flow deployed yet: " code { "flowgrid flow deploy FILE" } },
                Ok(list) => table {
                    tr { th { "Flow" } th { "Latest" } th { "Steps" } th { "Started by" } th { "Deployed (UTC)" } th { "Description" } }
                    @for flow in &list.flows {
                        tr {
                            td { a href=(format!("/flows/{}", flow.name)) { (flow.name) } }
                            td { (flow.latest_version) }
                            td { (flow.steps) }
                            td { (output::started_by(flow)) }
                            td { (utc_time(flow.deployed_ms)) }
                            td { (flow.description.as_deref().unwrap_or("")) }
                        }
                    }
                },
            }
            @if let Ok(FlowList { next_cursor: Some(after), .. }) = flows {
                p { a href=(format!("/?{}", form_urlencoded::Serializer::new(String::new()).append_pair("flows_after", after).finish())) { "Next flows" } }
            }
            @if actions.is_some() { p { a href="/deploy" { "Deploy a flow" } } }
            @match limits {
                Err(error) => { h2 { "Concurrency limits in use" } (unavailable("the limits", error)) }
                Ok(list) if list.limits.is_empty() => {}
                Ok(list) => { h2 { "Concurrency limits in use" } (limits_table(list, true)) }
            }
            h2 { "Latest runs " a href="/runs" { "(all)" } }
            @match recent {
                Err(error) => (unavailable("the runs", error)),
                Ok(runs) if runs.is_empty() => p.muted { "No run yet." },
                Ok(runs) => (runs_table(runs)),
            }
        },
    )
}

pub fn flow(
    info: &FlowInfo,
    recent: &Result<Vec<RunSummary>, String>,
    limits: &Result<LimitList, String>,
    actions: Option<&str>,
) -> Markup {
    let definition = &info.definition;
    let yaml = serde_norway::to_string(definition).unwrap_or_else(|error| format!("cannot print it: {error}"));
    layout(
        &info.name,
        false,
        html! {
            h1 { "Flow " (info.name) " version " (info.version) }
            @if let Some(description) = &definition.description { p { (description) } }
            @if let Some(schedule) = &definition.schedule {
                p.notice {
                    "Scheduled: a run "
                    @match (schedule.every_ms, &schedule.cron) {
                        (Some(every_ms), _) => { "every " (duration_ms(every_ms)) }
                        (None, Some(cron)) => { "at " code { (cron) } " (cron, " (schedule.timezone.as_deref().unwrap_or("UTC")) ")" }
                        (None, None) => {}
                    }
                    @if !schedule.input.is_null() { " with input " code { (schedule.input) } }
                    "."
                }
            }
            @let oldest_linked = info.version.saturating_sub(VERSIONS_LINKED).max(1);
            p.muted {
                "Deployed " (utc_time(info.deployed_ms)) " UTC. "
                @if info.version > 1 {
                    "Earlier versions: "
                    @for version in (oldest_linked..info.version).rev() {
                        a href=(format!("/flows/{}?version={version}", info.name)) { (version) } " "
                    }
                    @if oldest_linked > 1 {
                        @if oldest_linked > 2 { "… " }
                        a href=(format!("/flows/{}?version=1", info.name)) { "1" } " "
                    }
                }
                a href=(format!("/flows/{}", info.name)) { "the latest version" }
            }
            @if oldest_linked > 2 {
                form.filter method="get" action=(format!("/flows/{}", info.name)) {
                    label { "Version " input type="number" name="version" min="1" required; }
                    button type="submit" { "Show" }
                }
            }
            @if let Some(pause) = &info.paused {
                p.notice {
                    (status_badge("paused")) " since " (utc_time(pause.since_ms)) " UTC: " (pause.reason)
                    ". Its schedule and trigger start no runs until it is resumed."
                }
            }
            @if let (true, Some(token)) = (definition.schedule.is_some() || definition.trigger.is_some(), actions) {
                @let (verb, label) = if info.paused.is_some() { ("resume", "Resume its schedule and trigger") } else { ("pause", "Pause its schedule and trigger") };
                form.action method="post" action=(format!("/flows/{}/{verb}", info.name)) {
                    input type="hidden" name="token" value=(token);
                    button type="submit" { (label) }
                    (reason_input())
                }
            }
            (Layout::of(definition).svg(&HashMap::new()))
            @if let Some(token) = actions {
                form.action method="post" action="/runs" {
                    input type="hidden" name="token" value=(token);
                    input type="hidden" name="flow" value=(info.name);
                    // A key per page view, to which the start adds what the form asks: the same
                    // form posted twice starts one run, an edited one another.
                    input type="hidden" name="key" value=(format!("ui-{}", uuid::Uuid::new_v4()));
                    label { "Input (JSON) " textarea name="input" rows="3" placeholder="{}" {} }
                    label { "Labels " input type="text" name="labels" placeholder="customer=acme, source=web"; }
                    label { "Start at " input type="text" name="at" placeholder="now, or 2026-12-24T09:00:00Z, 2h"; }
                    button type="submit" { "Start a run of the latest version" }
                }
            }
            @if definition.concurrency.is_some() {
                h2 { "Concurrency limits in use" }
                @match limits {
                    Err(error) => (unavailable("the limits", error)),
                    Ok(list) if list.limits.is_empty() => p.muted { "No run of this flow is going or queued under its limit." },
                    Ok(list) => (limits_table(list, false)),
                }
            }
            h2 { "Latest runs of this flow" }
            @match recent {
                Err(error) => (unavailable("the runs", error)),
                Ok(runs) if runs.is_empty() => p.muted { "No run yet: " code { "flowgrid run start " (info.name) " --input JSON" } },
                Ok(runs) => (runs_table(runs)),
            }
            h2 { "Definition" }
            pre { (yaml) }
        },
    )
}

/// The limits of `limit.list`, one row per key (and flow, with `flow_column`).
fn limits_table(list: &LimitList, flow_column: bool) -> Markup {
    html! {
        table {
            tr {
                @if flow_column { th { "Flow" } }
                th { "Key" } th { "Max" } th { "Rate" } th { "When full" } th { "Going" } th { "Queued" } th { "Next start" }
            }
            @for limit in &list.limits {
                tr {
                    @if flow_column { td { a href=(format!("/flows/{}", limit.flow)) { (limit.flow) } } }
                    td { @if limit.key.is_empty() { "-" } @else { code { (limit.key) } } }
                    td { @if limit.max == 0 { "-" } @else { (limit.max) } }
                    td { @match limit.rate { Some(rate) => { (rate.runs) " per " (duration_ms(rate.per_ms)) } None => { "-" } } }
                    td { (limit.when_full.as_str()) }
                    td { (limit.going) }
                    td { @if limit.queued > 0 { span.queued { (limit.queued) } } @else { "0" } }
                    td { @match limit.next_start_ms { Some(next_ms) => { (utc_time(next_ms)) " UTC" } None => { "-" } } }
                }
            }
        }
        @if list.more > 0 { p.muted { (list.more) " more limits in use not shown (the busiest are)." } }
    }
}

/// What the runs list is filtered by.
pub struct RunsFilter {
    pub flow: Option<String>,
    pub status: Option<RunStatus>,
    /// Only the child runs of this run.
    pub parent: Option<RunId>,
    /// Only the runs with this label.
    pub label: Option<(String, String)>,
    /// Only the runs started at or after this time (Unix ms), and before `until`.
    pub since: Option<Millis>,
    pub until: Option<Millis>,
}

pub fn runs(filter: &RunsFilter, list: &RunList) -> Markup {
    let statuses = ["running", "succeeded", "failed", "cancelled", "timed_out"];
    let chosen = filter.status.map(RunStatus::as_str);
    let next_page = list.next_cursor.as_ref().map(|cursor| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("cursor", cursor);
        if let Some(flow) = &filter.flow {
            query.append_pair("flow", flow);
        }
        if let Some(status) = chosen {
            query.append_pair("status", status);
        }
        if let Some(parent) = &filter.parent {
            query.append_pair("parent", parent.as_str());
        }
        if let Some((key, value)) = &filter.label {
            query.append_pair("label", &format!("{key}={value}"));
        }
        for (name, time) in [("since", filter.since), ("until", filter.until)] {
            if let Some(time) = time {
                query.append_pair(name, &utc_time_ms(time));
            }
        }
        format!("/runs?{}", query.finish())
    });
    layout(
        "Runs",
        false,
        html! {
            h1 { "Runs" }
            @if let Some(parent) = &filter.parent {
                p { "Child runs of run " a href=(format!("/runs/{parent}")) { code { (parent) } } }
            }
            form.filter method="get" action="/runs" {
                @if let Some(parent) = &filter.parent { input type="hidden" name="parent" value=(parent); }
                label { "Flow " input type="text" name="flow" value=(filter.flow.as_deref().unwrap_or("")) placeholder="any"; }
                @let label = filter.label.as_ref().map(|(key, value)| format!("{key}={value}")).unwrap_or_default();
                label { "Label " input type="text" name="label" value=(label) placeholder="key=value"; }
                @let since = filter.since.map(utc_time_ms).unwrap_or_default();
                label { "Since " input type="text" name="since" value=(since) placeholder="2h, or 2026-12-05T10:00:00Z"; }
                @let until = filter.until.map(utc_time_ms).unwrap_or_default();
                label { "Until " input type="text" name="until" value=(until) placeholder="any"; }
                label {
                    "Status "
                    select name="status" {
                        option value="" selected[chosen.is_none()] { "any" }
                        @for status in statuses { option value=(status) selected[chosen == Some(status)] { (status) } }
                    }
                }
                button type="submit" { "Filter" }
            }
            @if list.runs.is_empty() && next_page.is_some() {
                p.muted { "No run matches among the newest this page looked at; older runs may." }
            } @else if list.runs.is_empty() {
                p.muted { "No run matches." }
            } @else {
                (runs_table(&list.runs))
            }
            @if let Some(next_page) = next_page { p { a href=(next_page) { "Older runs →" } } }
        },
    )
}

/// Child runs linked from a subflow step with items, at most this many.
const ITEM_CHILDREN_SHOWN: u32 = 50;

/// The child runs a subflow step with items started, by item (their ids follow from the
/// run, the step and the flow): at most [`ITEM_CHILDREN_SHOWN`]. None for a step a redrive
/// started again: the children it kept have ids of earlier rounds (the list of the run's
/// children has them all).
fn item_children(view: &RunView, definition: Option<&FlowDefinition>, step: &StepView) -> Vec<(u32, RunId)> {
    let (Some(definition), Some(counts)) = (definition, &step.items) else { return Vec::new() };
    if step.child_round > 0 {
        return Vec::new();
    }
    let flow = definition.steps.iter().find_map(|candidate| match candidate {
        Step::Subflow(subflow) if subflow.id == step.id => Some(subflow.flow.as_str()),
        _ => None,
    });
    let Some(flow) = flow else { return Vec::new() };
    let started = counts.succeeded + counts.failed + counts.running;
    (0..started.min(ITEM_CHILDREN_SHOWN))
        .map(|item| (item, ParentRef::child_run_id(flow, &view.run_id, &step.id, Some(item), step.child_round)))
        .collect()
}

/// Records of a run's history its page shows; `flowgrid run history` prints them all.
pub const HISTORY_SHOWN: u32 = 200;
/// Live output as it reads: the text of each run of pieces from one attempt.
fn live_by_attempt(live: &[LiveOutput]) -> Vec<(&AttemptId, String)> {
    let mut texts: Vec<(&AttemptId, String)> = Vec::new();
    for piece in live {
        match texts.last_mut() {
            Some((attempt, text)) if **attempt == piece.attempt => text.push_str(&piece.text()),
            _ => texts.push((&piece.attempt, piece.text().into_owned())),
        }
    }
    texts
}

/// Pieces of live output a run's page shows, the first ones.
pub const LIVE_PIECES_SHOWN: usize = 2_000;
/// Bytes of live output a run's page shows at most (a piece may hold 64 KiB, and the page
/// reloads every 2 s while the run goes).
pub const LIVE_BYTES_SHOWN: usize = 256 * 1024;

/// The live output a run's page shows: the first pieces the grid keeps of the run, at most
/// [`LIVE_PIECES_SHOWN`] of them and [`LIVE_BYTES_SHOWN`] of their text.
#[derive(Debug, Default)]
pub struct LiveShown {
    pub pieces: Vec<LiveOutput>,
    /// The bytes of text of `pieces`.
    bytes: usize,
    /// Whether `pieces` are all the live output the grid kept of the run when they were
    /// counted: not when a bound stopped them, a piece could not be read, their reading
    /// timed out or they could not be counted. The page then says where to read them all.
    pub complete: bool,
}

impl LiveShown {
    /// All there is of a run of which the grid keeps no live output.
    pub fn none_kept() -> LiveShown {
        LiveShown { complete: true, ..LiveShown::default() }
    }

    /// Takes `piece` unless the pieces are [`LIVE_PIECES_SHOWN`] already or its text would
    /// take theirs past [`LIVE_BYTES_SHOWN`] (the first piece is taken whatever its size);
    /// false when it was not taken, and no later piece should be.
    pub fn push(&mut self, piece: LiveOutput) -> bool {
        let bytes = piece.text().len();
        let full = self.pieces.len() >= LIVE_PIECES_SHOWN || self.bytes + bytes > LIVE_BYTES_SHOWN;
        if full && !self.pieces.is_empty() {
            return false;
        }
        self.bytes += bytes;
        self.pieces.push(piece);
        true
    }
}

pub fn run(
    view: &RunView,
    definition: Option<&FlowDefinition>,
    history: Option<&RunHistory>,
    live: &LiveShown,
    actions: Option<&str>,
    data_left_out: Option<&str>,
) -> Markup {
    let left_out = view.data_left_out || data_left_out.is_some();
    let running = view.status == RunStatus::Running;
    // A child run is redriven through its parent; a succeeded run only from a step.
    let ended = view.status.is_terminal() && view.parent.is_none();
    let redrivable = ended && view.status != RunStatus::Succeeded;
    let now = now_ms();
    let end = view.ended_ms.unwrap_or(now);
    let total = end.saturating_sub(view.created_ms).max(1);
    let statuses: HashMap<&str, StepStatus> = view.steps.iter().map(|step| (step.id.as_str(), step.status)).collect();
    // Signal steps that take a signal now: waiting, or not started and keeping one sent early.
    let keeps_early = |id: &str| {
        definition.is_some_and(|definition| {
            definition
                .steps
                .iter()
                .any(|step| matches!(step, Step::Signal(signal) if signal.id == id && signal.keep_early))
        })
    };
    let signals: Vec<&StepView> = view
        .steps
        .iter()
        .filter(|step| step.kind == "signal")
        .filter(|step| {
            step.status == StepStatus::Running
                || (running && step.status == StepStatus::Pending && step.output.is_none() && keeps_early(&step.id))
        })
        .collect();
    // Task steps handed off as async tasks that report their token as progress (`token`).
    let handed_off: Vec<(&StepView, &str)> = view
        .steps
        .iter()
        .filter(|step| step.kind == "task" && step.status == StepStatus::Running)
        .filter_map(|step| {
            let token = step.progress.as_ref()?.get("token")?.as_str()?;
            token.starts_with("fgt1.").then_some((step, token))
        })
        .collect();
    // A page with forms (every running run's, with actions: its pause and cancel take a
    // reason) does not reload under the user's hands.
    let refresh = running && actions.is_none();
    layout(
        &format!("Run {}", view.run_id),
        refresh,
        html! {
            h1 {
                "Run " code { (view.run_id) } " " (status_badge(view.status.as_str()))
                @if view.paused.is_some() { " " (status_badge("paused")) }
            }
            @if left_out {
                p.notice {
                    "Its input and outputs are left out"
                    @if let Some(why) = data_left_out { " (" (why) ")" }
                    ": see " a href="#data" { "Input and outputs" } " below."
                }
            }
            table {
                tr { th { "Flow" } td { a href=(format!("/flows/{}?version={}", view.flow, view.version)) { (view.flow) "@" (view.version) } } }
                @if let Some(parent) = &view.parent {
                    tr {
                        th { "Parent" }
                        td {
                            a href=(format!("/runs/{}", parent.run_id)) { code { (parent.run_id) } }
                            " (step " (parent.step) @if let Some(item) = parent.item { ", item " (item) } ")"
                        }
                    }
                }
                tr { th { "Created (UTC)" } td { (utc_time(view.created_ms)) } }
                @if !view.labels.is_empty() {
                    tr { th { "Labels" } td { @for (key, value) in &view.labels { code { (key) "=" (value) } " " } } }
                }
                @if let Some(redriven) = &view.redriven {
                    tr { th { "Redriven" } td { (output::redriven(redriven)) } }
                }
                @if let Some(paused) = &view.paused {
                    tr { th { "Paused" } td { (output::paused(paused)) } }
                }
                @if let Some(delayed) = &view.delayed {
                    tr { th { "Delayed" } td { (output::delayed(delayed)) } }
                }
                @if let Some(handler) = &view.on_failure_run {
                    tr { th { "Failure handler" } td { a href=(format!("/runs/{handler}")) { code { (handler) } } " (its flow's on_failure)" } }
                }
                @if let Some(queued) = &view.queued {
                    tr { th { "Queued" } td { (output::queued(queued)) } }
                }
                tr {
                    th { "Duration" }
                    td {
                        (duration_ms(end.saturating_sub(view.created_ms)))
                        @if refresh { " so far (this page reloads every " (REFRESH_S) " s)" }
                        @else if running { " so far (reload the page to follow the run)" }
                    }
                }
            }
            @if let Some(error) = &view.error {
                div.error { strong { (error.code) } ": " (error.message) }
            }
            @for step in &signals {
                div.notice {
                    "Step " strong { (step.id) }
                    @if step.status == StepStatus::Pending { " keeps a signal sent before it starts" } @else { " waits for a signal" }
                    @if let Some(token) = actions {
                        form.action method="post" action=(format!("/runs/{}/signal", view.run_id)) {
                            input type="hidden" name="token" value=(token);
                            input type="hidden" name="step" value=(step.id);
                            label { "Data (JSON) " textarea name="data" rows="2" placeholder="null" {} }
                            button type="submit" { "Send the signal" }
                        }
                    } @else {
                        ": " code { "flowgrid run signal " (view.run_id) " " (step.id) " --data JSON" }
                    }
                }
            }
            @for (step, task_token) in &handed_off {
                div.notice {
                    "Step " strong { (step.id) } " was handed off as an async task and waits for its result"
                    @if let Some(token) = actions {
                        form.action method="post" action=(format!("/runs/{}/complete", view.run_id)) {
                            input type="hidden" name="token" value=(token);
                            input type="hidden" name="task_token" value=(task_token);
                            label { "Output (JSON) " textarea name="output" rows="2" placeholder="null" {} }
                            label { " or fail it with the error code " input name="error" size="16" {} }
                            button type="submit" { "Complete the task" }
                        }
                    } @else {
                        ": " code { "flowgrid task complete " (task_token) " --output JSON" }
                    }
                }
            }
            @if let (true, Some(token)) = (running, actions) {
                @let (verb, label) = if view.paused.is_some() { ("resume", "Resume this run") } else { ("pause", "Pause this run") };
                form.action method="post" action=(format!("/runs/{}/{verb}", view.run_id)) {
                    input type="hidden" name="token" value=(token);
                    button type="submit" { (label) }
                    (reason_input())
                }
                form.action method="post" action=(format!("/runs/{}/cancel", view.run_id)) {
                    input type="hidden" name="token" value=(token);
                    button type="submit" { "Cancel this run" }
                    (reason_input())
                }
            }
            @if let (true, Some(token)) = (redrivable, actions) {
                form.action method="post" action=(format!("/runs/{}/redrive", view.run_id)) {
                    input type="hidden" name="token" value=(token);
                    button type="submit" { "Redrive this run" }
                    " from the steps that did not succeed"
                    (reason_input())
                }
            }
            @if let (true, Some(token)) = (ended, actions) {
                form.action method="post" action=(format!("/runs/{}/redrive", view.run_id)) {
                    input type="hidden" name="token" value=(token);
                    label {
                        "Run again from step "
                        select name="from" {
                            @for step in view.steps.iter().filter(|step| step.status != StepStatus::Skipped) {
                                option value=(step.id) { (step.id) }
                            }
                        }
                    }
                    " "
                    button type="submit" { "Redrive from this step" }
                    " (it and every step after it run again)"
                    (reason_input())
                }
            }
            @if let Some(definition) = definition {
                h2 { "Steps" }
                (Layout::of(definition).svg(&statuses))
            }
            table {
                tr { th { "Step" } th { "Kind" } th { "Status" } th { "Attempts" } th { "Items" } th { "Duration" } th { "Timeline" } }
                @for step in &view.steps {
                    tr {
                        td { (step.id) }
                        td { (step.kind) }
                        td { (status_badge(step.status.as_str())) @if step.caught { " (caught)" } }
                        td { (step.attempts) @if step.cached > 0 { " (" (step.cached) " from the task cache)" } }
                        td { (step.items.as_ref().map(item_counts).unwrap_or_default()) }
                        td { (step_duration(step, now)) }
                        td { (timeline(step, view.created_ms, total, now)) }
                    }
                    @if let Some(child) = &step.child_run {
                        tr {
                            td {}
                            td colspan="6" {
                                "Child run " a href=(format!("/runs/{child}")) { code { (child) } }
                                @if let Some(iteration) = step.iteration {
                                    " (loop iteration " (iteration) "; "
                                    a href=(format!("/runs?parent={}", view.run_id)) { "all iterations" } ")"
                                }
                            }
                        }
                    }
                    @let children = item_children(view, definition, step);
                    @if !children.is_empty() || (step.kind == "subflow" && step.child_round > 0) {
                        tr {
                            td {}
                            td colspan="6" {
                                @if !children.is_empty() {
                                    "Child runs by item: "
                                    @for (item, child) in &children { a href=(format!("/runs/{child}")) { (item) } " " }
                                    @if let Some(counts) = &step.items {
                                        @if counts.total as usize > children.len() { "(the first " (children.len()) " of " (counts.total) ") " }
                                    }
                                }
                                a href=(format!("/runs?parent={}", view.run_id)) { "all child runs" }
                            }
                        }
                    }
                    @if let Some(progress) = &step.progress {
                        tr { td {} td colspan="6" { "Progress: " code { (progress) } } }
                    }
                    @if let Some(error) = &step.error {
                        tr { td {} td colspan="6" { span.failed { (error.code) } ": " (error.message) } }
                    }
                }
            }
            @if !live.pieces.is_empty() || !live.complete {
                h2 { "Live output" }
                @for (attempt, text) in live_by_attempt(&live.pieces) {
                    p {
                        (attempt.step) @if let Some(item) = attempt.item { ", item " (item) } ", attempt " (attempt.attempt)
                    }
                    pre { (text) }
                }
                @if !live.complete {
                    p {
                        @if live.pieces.is_empty() { "It could not be read now: " } @else { "The first " (live.pieces.len()) " pieces: " }
                        code { "flowgrid run tail " (view.run_id) } " prints them all."
                    }
                }
            }
            @if left_out {
                h2 #data { "Input and outputs" }
                p.notice {
                    "Left out: the run is too large to read in one message. Its history holds its input and what its tasks, "
                    "signals and child runs answered: " code { "flowgrid run history " (view.run_id) " --json" }
                    " prints it whole, as " code { "GET /api/runs/" (view.run_id) "/history" } " answers it (the history "
                    "below shortens long values and shows its first " (HISTORY_SHOWN) " records)."
                }
            } @else {
                h2 { "Input" }
                pre { (pretty_cut(&view.input, &view.run_id)) }
                @if let Some(output) = &view.output {
                    h2 { "Output" }
                    pre { (pretty_cut(output, &view.run_id)) }
                }
                @let outputs: Vec<&StepView> = view.steps.iter().filter(|step| step.output.is_some()).collect();
                @if !outputs.is_empty() {
                    h2 { "Step outputs" }
                    @for step in outputs {
                        details { summary { (step.id) } pre { (pretty_cut(step.output.as_ref().expect("filtered"), &view.run_id)) } }
                    }
                }
            }
            @if let Some(history) = history {
                h2 { "History" }
                table {
                    tr { th { "Seq" } th { "At" } th { "What" } }
                    @for record in &history.records {
                        tr {
                            td { (record.seq) }
                            td { "+" (duration_ms(record.at_ms.saturating_sub(view.created_ms))) }
                            td { (crate::history::describe(record)) }
                        }
                    }
                }
                @if history.next.is_some() {
                    p { "The first " (history.records.len()) " records; all of them: " code { "flowgrid run history " (view.run_id) } }
                }
            }
        },
    )
}

fn step_duration(step: &StepView, now: u64) -> String {
    match (step.started_ms, step.ended_ms) {
        (Some(started), Some(ended)) => duration_ms(ended.saturating_sub(started)),
        (Some(started), None) => format!("{} so far", duration_ms(now.saturating_sub(started))),
        _ => String::new(),
    }
}

/// Where a step ran within its run: a bar from its start to its end (or now).
fn timeline(step: &StepView, created_ms: u64, total: u64, now: u64) -> Markup {
    let Some(started) = step.started_ms else { return html! {} };
    let ended = step.ended_ms.unwrap_or(now);
    let left = started.saturating_sub(created_ms) as f64 * 100.0 / total as f64;
    let width = ended.saturating_sub(started) as f64 * 100.0 / total as f64;
    html! {
        div.bar title=(format!("{} to {} ms after the run started", started.saturating_sub(created_ms), ended.saturating_sub(created_ms))) {
            span style=(format!("left: {left:.2}%; width: {:.2}%", width.min(100.0 - left))) {}
        }
    }
}

/// The page of a failed request: why, the problems the grid located (a definition's, an
/// input's against its flow's schema), and a link to `back` (the page of the form that was
/// sent) or to the overview.
pub fn failure(status: u16, message: &str, issues: &[Issue], back: Option<&str>) -> Markup {
    layout(
        "Error",
        false,
        html! {
            h1 { "Error " (status) }
            div.error {
                (message)
                @if !issues.is_empty() {
                    ul { @for issue in issues { li { code { (issue.path) } ": " (issue.message) } } }
                }
            }
            p {
                @if let Some(back) = back { a href=(back) { "Back to " (back) } " · " }
                a href="/" { "Back to the overview" }
            }
        },
    )
}

/// The answer to a start form sent again as it was (a double click, a reload that posts
/// again): the run it started the first time, and no other.
pub fn started_already(started: &RunStarted, back: &str) -> Markup {
    let run_path = format!("/runs/{}", started.run_id);
    layout(
        "Started already",
        false,
        html! {
            h1 { "Started already" }
            p.notice {
                "This form was sent already: it started run " a href=(run_path) { code { (started.run_id) } }
                " of " (started.flow) "@" (started.version) ", and no other run was started."
            }
            p { a href=(back) { "Back to " (back) } " to start another" }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_of_many_versions_links_the_latest_ones_and_the_first() {
        let definition = flowgrid_model::parse_definition(
            "name: many\nsteps:\n  - { id: t, kind: transform, output: '1' }\n",
            &flowgrid_model::Limits::default(),
        )
        .unwrap();
        let info = |version| FlowInfo {
            name: "many".into(),
            version,
            deployed_ms: 0,
            definition: definition.clone(),
            paused: None,
        };
        let linked = |page: &str| page.matches(r#"href="/flows/many?version="#).count();
        let page = flow(&info(100_000), &Ok(Vec::new()), &Err("none".into()), None).into_string();
        assert_eq!(linked(&page), VERSIONS_LINKED as usize + 1, "{page}");
        assert!(
            page.contains(r#"href="/flows/many?version=99999""#) && page.contains(r#"href="/flows/many?version=1""#)
        );
        assert!(!page.contains(r#"href="/flows/many?version=99979""#), "{page}");
        assert!(page.contains(r#"name="version""#), "a form shows any version: {page}");
        assert!(page.len() < 16 * 1024, "{}", page.len());
        // A flow of few versions links them all, with no form.
        let page = flow(&info(3), &Ok(Vec::new()), &Err("none".into()), None).into_string();
        assert_eq!(linked(&page), 2, "{page}");
        assert!(!page.contains(r#"name="version""#), "{page}");
    }

    /// A succeeded run of one task step, with an input and outputs.
    fn succeeded_run() -> RunView {
        serde_json::from_value(serde_json::json!({
            "run_id": "r1", "flow": "f", "version": 1, "status": "succeeded", "created_ms": 0, "ended_ms": 1_000,
            "input": {"given": "the-input"}, "output": {"made": "the-output"},
            "steps": [{"id": "t", "kind": "task", "status": "succeeded", "attempts": 1, "output": {"step": "the-step-output"}}],
        }))
        .unwrap()
    }

    fn piece(seq: u64, text: &str) -> LiveOutput {
        let attempt = AttemptId { run_id: RunId("r1".into()), step: "t".into(), item: None, attempt: 1 };
        LiveOutput { attempt, seq, data: Value::String(text.to_owned()) }
    }

    /// A run read without its data (too large for one message) has a null input and no
    /// outputs: its page says where they are instead of showing those as the run's.
    #[test]
    fn a_run_read_without_its_data_says_where_to_read_it() {
        let none = LiveShown::none_kept();
        let whole = run(&succeeded_run(), None, None, &none, None, None).into_string();
        for shown in ["<h2>Input</h2>", "the-input", "the-output", "the-step-output"] {
            assert!(whole.contains(shown), "{shown}: {whole}");
        }
        assert!(!whole.contains("left out"), "{whole}");
        let mut brief = succeeded_run();
        brief.drop_data();
        let why = "the reply is 2000000 bytes, over the server's max_payload";
        let page = run(&brief, None, None, &none, None, Some(why)).into_string();
        assert!(page.contains(&format!("Its input and outputs are left out ({why})")), "{page}");
        for said in ["<code>flowgrid run history r1 --json</code>", "<code>GET /api/runs/r1/history</code>"] {
            assert!(page.contains(said), "{said}: {page}");
        }
        for not_shown in ["<h2>Input</h2>", "<pre>null</pre>", "<h2>Output</h2>", "Step outputs", "history below holds"]
        {
            assert!(!page.contains(not_shown), "{not_shown}: {page}");
        }
    }

    /// The pieces shown stop before their text would pass the bound, the first whatever its
    /// size, and at the bound on their number.
    #[test]
    fn live_output_shown_stays_within_its_bounds() {
        let mut shown = LiveShown::default();
        let large = "x".repeat(LIVE_BYTES_SHOWN * 2 / 5);
        assert!(shown.push(piece(1, &large)) && shown.push(piece(2, &large)));
        assert!(!shown.push(piece(3, &large)), "a third would pass {LIVE_BYTES_SHOWN} bytes");
        let bytes: usize = shown.pieces.iter().map(|piece| piece.text().len()).sum();
        assert!(shown.pieces.len() == 2 && bytes <= LIVE_BYTES_SHOWN, "{} pieces, {bytes} bytes", shown.pieces.len());

        let mut shown = LiveShown::default();
        assert!(shown.push(piece(1, &"x".repeat(LIVE_BYTES_SHOWN + 1))), "the first piece is shown whatever its size");
        assert!(!shown.push(piece(2, "y")));

        let mut shown = LiveShown::default();
        assert!((1..=LIVE_PIECES_SHOWN as u64).all(|seq| shown.push(piece(seq, "a"))));
        assert!(!shown.push(piece(LIVE_PIECES_SHOWN as u64 + 1, "a")));
        assert_eq!(shown.pieces.len(), LIVE_PIECES_SHOWN);
    }

    /// Live output that is not all the grid keeps (a bound, a read that timed out, a count
    /// that failed) is said to be only the first pieces; all of it is shown as it is.
    #[test]
    fn live_output_cut_short_says_where_to_read_it_all() {
        let view = succeeded_run();
        let note = "<code>flowgrid run tail r1</code> prints them all.";
        let mut live = LiveShown::default();
        assert!(live.push(piece(1, "first words")));
        let page = run(&view, None, None, &live, None, None).into_string();
        assert!(page.contains("first words") && page.contains(&format!("The first 1 pieces: {note}")), "{page}");
        live.complete = true;
        let page = run(&view, None, None, &live, None, None).into_string();
        assert!(page.contains("first words") && !page.contains(note), "{page}");
        let page = run(&view, None, None, &LiveShown::default(), None, None).into_string();
        assert!(page.contains(&format!("It could not be read now: {note}")), "{page}");
        let page = run(&view, None, None, &LiveShown::none_kept(), None, None).into_string();
        assert!(!page.contains("Live output"), "{page}");
    }

    #[test]
    fn a_large_value_is_cut_on_the_run_page_saying_where_the_whole_is() {
        let run_id = RunId("r1".into());
        let small = serde_json::json!({"a": "é".repeat(10)});
        assert_eq!(pretty_cut(&small, &run_id), pretty(&small));
        let large = serde_json::json!("é".repeat(VALUE_BYTES_SHOWN));
        let shown = pretty_cut(&large, &run_id);
        assert!(shown.len() < VALUE_BYTES_SHOWN + 200, "{}", shown.len());
        assert!(shown.ends_with("(`flowgrid --json run get r1` or GET /api/runs/r1 has it whole)"), "{shown}");
        assert!(shown.contains(&format!("{} bytes in all", pretty(&large).len())));
    }
}
