//! Human-readable output: padded tables, durations and UTC times. Data goes to stdout;
//! callers write diagnostics to stderr themselves.

use std::borrow::Cow;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use flowgrid_model::Millis;

/// A map step's progress: `done/total`, and how many failed.
pub fn item_counts(items: &flowgrid_engine::ItemCounts) -> String {
    let done = items.succeeded + items.failed;
    if items.failed > 0 {
        format!("{done}/{} ({} failed)", items.total, items.failed)
    } else {
        format!("{done}/{}", items.total)
    }
}

/// A table with a header row; columns are padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|cell| (*cell).to_owned()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len(), "a row has one cell per column");
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, without trailing spaces; a cell over
    /// [`CELL_CHARS_MAX`] is cut short with `…`.
    pub fn render(&self) -> String {
        let rows = shown_rows(std::iter::once(&self.header).chain(&self.rows));
        lines(&rows, &widths(&rows, &[]))
    }
}

/// A table printed a page of rows at a time (`run history`), for listings too long to hold
/// whole: the header comes with the first page, whose widest cells (and `min_widths`) set
/// the columns' widths for every page, so that the pages line up; a wider cell on a later
/// page pushes the rest of its row over.
#[derive(Debug)]
pub struct PagedTable {
    header: Vec<String>,
    widths: Option<Vec<usize>>,
}

impl PagedTable {
    pub fn new(header: &[&str]) -> PagedTable {
        PagedTable { header: header.iter().map(|cell| (*cell).to_owned()).collect(), widths: None }
    }

    /// One page of rows as text, after the header for the first page; `min_widths` count
    /// for the first page only. A first page that is the last renders as [`Table::render`].
    pub fn page(&mut self, rows: Vec<Vec<String>>, min_widths: &[usize]) -> String {
        let header = self.widths.is_none().then_some(&self.header);
        let rows = shown_rows(header.into_iter().chain(&rows));
        let widths = self.widths.get_or_insert_with(|| widths(&rows, min_widths));
        lines(&rows, widths)
    }
}

/// Rows as their cells are shown.
fn shown_rows<'a>(rows: impl Iterator<Item = &'a Vec<String>>) -> Vec<Vec<Cow<'a, str>>> {
    rows.map(|row| row.iter().map(|cell| shown(cell)).collect()).collect()
}

/// The width of each column: its widest cell, at least its `min_widths` (when given).
fn widths(rows: &[Vec<Cow<str>>], min_widths: &[usize]) -> Vec<usize> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths: Vec<usize> = (0..columns).map(|column| min_widths.get(column).copied().unwrap_or(0)).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths
}

/// Rows as lines, each cell padded to its column's width and two spaces, without trailing
/// spaces; a cell wider than its column is followed by the two spaces only.
fn lines(rows: &[Vec<Cow<str>>], widths: &[usize]) -> String {
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', width.saturating_sub(cell.chars().count()) + 2));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// The most characters a table cell shows (a flow's long description, a long error);
/// `--json` has every one.
const CELL_CHARS_MAX: usize = 200;

fn shown(cell: &str) -> Cow<'_, str> {
    let cell = printable(cell);
    match cell.char_indices().nth(CELL_CHARS_MAX) {
        None => cell,
        Some(_) => {
            let cut = cell.char_indices().nth(CELL_CHARS_MAX - 1).map_or(cell.len(), |(at, _)| at);
            Cow::Owned(format!("{}…", &cell[..cut]))
        }
    }
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`): what a run's labels, a
/// worker's error or a reason hold is shown on one line, and cannot move the cursor,
/// colour the terminal or pass for a line of the command's own.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|character| match character.is_control() {
                true => character.escape_default().to_string(),
                false => character.to_string(),
            })
            .collect(),
    )
}

/// `text` as one word of a POSIX shell command line: as it is when it holds only characters
/// no shell reads as special, else in single quotes (a `'` in it as `'\''`).
pub fn shell_word(text: &str) -> Cow<'_, str> {
    let plain = |character: char| character.is_ascii_alphanumeric() || "-_./:=@,+%".contains(character);
    if !text.is_empty() && text.chars().all(plain) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(format!("'{}'", text.replace('\'', "'\\''")))
}

/// Set once a write to stdout found its reader gone.
static READER_GONE: AtomicBool = AtomicBool::new(false);

/// Writes command output to stdout. A reader that stopped reading (`flowgrid run list |
/// head`) is not an error: it has what it wanted, and the command finishes what it was
/// doing quietly (see [`stop_if_reader_gone`] for commands that only print).
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            READER_GONE.store(true, Ordering::Relaxed);
            Ok(())
        }
        done => done.map_err(Into::into),
    }
}

/// For commands that print until a run ends (`run tail`, `run watch`), or page after page
/// (`run history`), and change nothing: ends the process, as other Unix tools do, once
/// stdout's reader has gone (`flowgrid run watch RUN | grep -m1 failed`), instead of
/// printing into nothing until the run ends, the command's timeout or the last page.
pub fn stop_if_reader_gone() {
    if READER_GONE.load(Ordering::Relaxed) {
        std::process::exit(crate::EXIT_PIPE_CLOSED);
    }
}

/// `print!` through [`emit`]; evaluates to its `anyhow::Result`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::emit(&format!($($arg)*))
    };
}

/// `println!` through [`emit`]; evaluates to its `anyhow::Result`.
macro_rules! outln {
    () => {
        $crate::output::emit("\n")
    };
    ($($arg:tt)*) => {
        $crate::output::emit(&format!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?)
}

/// `850ms`, `12.3s`, `4m05s`, `2h03m`.
pub fn duration_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1_000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, (ms / 1_000) % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

/// Wall-clock time in Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|since| since.as_millis() as Millis).unwrap_or(0)
}

/// The time between `start` and `end`, or `-` when either is unknown.
pub fn span(start: Option<Millis>, end: Option<Millis>) -> String {
    match (start, end) {
        (Some(start), Some(end)) => duration_ms(end.saturating_sub(start)),
        _ => "-".to_owned(),
    }
}

/// What starts runs of a flow besides its callers: its schedule and its trigger, `-` for
/// neither.
pub fn started_by(flow: &flowgrid_proto::FlowSummary) -> String {
    let mut parts = Vec::new();
    if let Some(schedule) = &flow.schedule {
        match (&schedule.every_ms, &schedule.cron) {
            (Some(every_ms), _) => parts.push(format!("every {}", duration_ms(*every_ms))),
            (None, Some(cron)) => {
                parts.push(format!("cron {cron} ({})", schedule.timezone.as_deref().unwrap_or("UTC")))
            }
            (None, None) => {}
        }
    }
    if let Some(trigger) = &flow.trigger {
        match &trigger.subject {
            Some(subject) => parts.push(format!("stream {} ({subject})", trigger.stream)),
            None => parts.push(format!("stream {}", trigger.stream)),
        }
    }
    // A flow paused before it has a schedule or a trigger stays paused when a later
    // version brings one: say so too.
    match (parts.is_empty(), &flow.paused) {
        (true, None) => "-".to_owned(),
        (true, Some(_)) => "- (paused)".to_owned(),
        (false, None) => parts.join(", "),
        (false, Some(_)) => format!("{} (paused)", parts.join(", ")),
    }
}

/// The limits of `limit.list`: one row per flow and key, with what bounds it, what a run
/// past it does, its runs going and queued, and when its rate lets the next one go.
pub fn limit_table(list: &flowgrid_proto::LimitList) -> Table {
    let mut table = Table::new(&["FLOW", "KEY", "MAX", "RATE", "WHEN FULL", "GOING", "QUEUED", "NEXT START"]);
    for limit in &list.limits {
        let max = if limit.max == 0 { "-".to_owned() } else { limit.max.to_string() };
        let rate = limit.rate.map_or("-".to_owned(), |rate| format!("{} per {}", rate.runs, duration_ms(rate.per_ms)));
        let next = limit
            .next_start_ms
            .map_or("-".to_owned(), |next_ms| format!("in {}", duration_ms(next_ms.saturating_sub(now_ms()))));
        let key = if limit.key.is_empty() { "-".to_owned() } else { limit.key.clone() };
        let row = [
            limit.flow.clone(),
            key,
            max,
            rate,
            limit.when_full.as_str().to_owned(),
            limit.going.to_string(),
            limit.queued.to_string(),
            next,
        ];
        table.row(row.to_vec());
    }
    table
}

/// How often a run was redriven, and when last: `once, last at ...` or `3 times, last at ...`.
pub fn redriven(redriven: &flowgrid_engine::Redriven) -> String {
    let times = if redriven.times == 1 { "once".to_owned() } else { format!("{} times", redriven.times) };
    format!("{times}, last at {}", utc_time(redriven.last_ms))
}

/// `since <time>: <reason>; holding steps a, b` for a paused run.
pub fn paused(paused: &flowgrid_engine::Paused) -> String {
    format!("since {}: {}{}", utc_time(paused.since_ms), paused.reason, holding(&paused.held))
}

/// A delayed run's line: until when it waits and what it holds.
pub fn delayed(delayed: &flowgrid_engine::Delayed) -> String {
    let until = utc_time(delayed.until_ms);
    format!("until {until}: the start time it was started with{}", holding(&delayed.held))
}

/// A queued run's line: since when it waits and what it holds.
pub fn queued(queued: &flowgrid_engine::Queued) -> String {
    let since = utc_time(queued.since_ms);
    format!("since {since}: waiting for its turn under its flow's concurrency limit{}", holding(&queued.held))
}

/// `; holding step a` (or steps), for the steps a paused or queued run holds.
fn holding(held: &[String]) -> String {
    match held.len() {
        0 => String::new(),
        1 => format!("; holding step {}", held[0]),
        _ => format!("; holding steps {}", held.join(", ")),
    }
}

pub fn utc_time(ms: Millis) -> String {
    flowgrid_model::utc_time(ms, false)
}

/// The time to the millisecond, as `--since` and `--until` read it back.
pub fn utc_time_ms(ms: Millis) -> String {
    flowgrid_model::utc_time(ms, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_pads_its_columns_and_cuts_a_very_long_cell_short() {
        let mut table = Table::new(&["NAME", "DESCRIPTION"]);
        table.row(vec!["a".into(), "short".into()]);
        table.row(vec!["bigdef".into(), "d".repeat(70_000)]);
        let text = table.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME    DESCRIPTION");
        assert_eq!(lines[1], "a       short");
        assert_eq!(lines[2], format!("bigdef  {}…", "d".repeat(CELL_CHARS_MAX - 1)));
        assert_eq!(shown("é".repeat(CELL_CHARS_MAX).as_str()), "é".repeat(CELL_CHARS_MAX));
    }

    #[test]
    fn a_flow_is_started_by_its_schedule_its_trigger_or_only_its_callers() {
        let mut flow = flowgrid_proto::FlowSummary {
            name: "f".into(),
            latest_version: 1,
            deployed_ms: 0,
            steps: 1,
            description: None,
            schedule: None,
            trigger: None,
            paused: None,
        };
        assert_eq!(started_by(&flow), "-");
        flow.schedule = Some(flowgrid_model::Schedule { every_ms: Some(60_000), ..Default::default() });
        flow.trigger = Some(flowgrid_model::Trigger {
            stream: "ORDERS".into(),
            subject: Some("orders.*.created".into()),
            ..Default::default()
        });
        assert_eq!(started_by(&flow), "every 1m00s, stream ORDERS (orders.*.created)");
        flow.schedule = Some(flowgrid_model::Schedule { cron: Some("0 */6 * * *".into()), ..Default::default() });
        flow.trigger = Some(flowgrid_model::Trigger { stream: "ORDERS".into(), ..Default::default() });
        assert_eq!(started_by(&flow), "cron 0 */6 * * * (UTC), stream ORDERS");
        flow.paused = Some(flowgrid_proto::FlowPause { since_ms: 0, reason: "incident".into() });
        assert_eq!(started_by(&flow), "cron 0 */6 * * * (UTC), stream ORDERS (paused)");
        let berlin = flowgrid_model::Schedule {
            cron: Some("0 9 * * 1-5".into()),
            timezone: Some("Europe/Berlin".into()),
            ..Default::default()
        };
        flow.schedule = Some(berlin);
        assert_eq!(started_by(&flow), "cron 0 9 * * 1-5 (Europe/Berlin), stream ORDERS (paused)");
        flow.schedule = None;
        flow.trigger = None;
        assert_eq!(started_by(&flow), "- (paused)", "a pause kept for a later version's schedule");
    }

    #[test]
    fn control_characters_in_cells_and_texts_are_escaped() {
        assert_eq!(printable("a\nstatus    succeeded\u{1b}[31mRED"), "a\\nstatus    succeeded\\u{1b}[31mRED");
        assert!(matches!(printable("plain é"), Cow::Borrowed("plain é")));
        let mut table = Table::new(&["LABEL"]);
        table.row(vec!["x\ny".to_owned()]);
        assert_eq!(table.render(), "LABEL\nx\\ny\n");
    }

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let mut table = Table::new(&["NAME", "N"]);
        table.row(vec!["a".into(), "100".into()]);
        table.row(vec!["longer".into(), "2".into()]);
        assert_eq!(table.render(), "NAME    N\na       100\nlonger  2\n");
    }

    #[test]
    fn a_paged_table_keeps_the_widths_of_its_first_page() {
        let row = |seq: &str, what: &str| vec![seq.to_owned(), what.to_owned()];
        let mut whole = Table::new(&["SEQ", "WHAT"]);
        whole.row(row("0", "started"));
        let mut one_page = PagedTable::new(&["SEQ", "WHAT"]);
        assert_eq!(one_page.page(vec![row("0", "started")], &[]), whole.render(), "one page is a table");

        let mut paged = PagedTable::new(&["SEQ", "WHAT"]);
        assert_eq!(paged.page(vec![row("9", "a")], &[4]), "SEQ   WHAT\n9     a\n");
        assert_eq!(paged.page(vec![row("10", "b\nc")], &[]), "10    b\\nc\n", "no header, the same widths");
        assert_eq!(paged.page(vec![row("123456", "d")], &[]), "123456  d\n", "a wider cell pushes its row");
        assert_eq!(paged.page(Vec::new(), &[]), "");
    }

    #[test]
    fn words_a_shell_reads_as_special_are_quoted() {
        assert_eq!(shell_word("01a2-r1"), "01a2-r1");
        assert_eq!(shell_word("it's $HOME"), "'it'\\''s $HOME'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn durations_pick_a_readable_unit() {
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(12_345), "12.3s");
        assert_eq!(duration_ms(245_000), "4m05s");
        assert_eq!(duration_ms(7_380_000), "2h03m");
        assert_eq!(span(Some(10), None), "-");
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc_time(1_740_832_496_789), "2025-03-01T12:34:56Z");
        assert_eq!(utc_time_ms(1_740_832_496_789), "2025-03-01T12:34:56.789Z");
        assert_eq!(flowgrid_sdk::parse_time(&utc_time_ms(1_740_832_496_789)), Ok(1_740_832_496_789));
    }
}
