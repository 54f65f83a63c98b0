//! `flowgrid flow backfill`: the runs a flow's schedule would have started in a past span.
//!
//! Each slot's run is started as the schedule itself starts it
//! ([`StartRun::for_schedule_slot`]: its input, labels and idempotency key), so its run id
//! is the one the schedule gives that slot: a slot
//! that has its run (started by the schedule, or by an earlier backfill) is not started
//! again, and a backfill cut short is finished by running it again.

use std::process::ExitCode;

use anyhow::{bail, Context};
use serde_json::json;

use flowgrid_model::schedule::Timetable;
use flowgrid_model::Millis;
use flowgrid_sdk::{Client, StartRun};

use crate::output::{now_ms, outln, print_json, utc_time};
use crate::Session;

/// The most slots one backfill starts: every slot is a run the grid keeps, so a span of
/// more (a year of minutes) is more likely a mistake than a wish; a wider span is
/// backfilled a part at a time.
pub(super) const BACKFILL_SLOTS_MAX: usize = 10_000;
/// Starts sent in one request: well under `START_MANY_RUNS_MAX`, so that a progress line
/// follows every hundred slots.
const STARTS_PER_REQUEST: usize = 100;

/// What a backfill asks for: the flow, and its span of slots.
pub(super) struct Backfill<'a> {
    pub flow: &'a str,
    pub since_ms: Millis,
    /// `None`: now.
    pub until_ms: Option<Millis>,
    pub dry_run: bool,
}

/// Starts the run of every slot of the flow's schedule from `since_ms` to `until_ms`
/// (default now), oldest first, with the schedule's input and labels; exit 1 if any start
/// was refused.
pub(super) async fn backfill(client: &Client, request: Backfill<'_>, session: &Session) -> anyhow::Result<ExitCode> {
    let now = now_ms();
    let until_ms = request.until_ms.unwrap_or(now);
    if until_ms > now {
        bail!(
            "--until {} is ahead: the schedule starts the runs of the slots to come by itself; give a time past, or \
             leave --until out for now",
            utc_time(until_ms)
        );
    }
    if request.since_ms >= until_ms {
        bail!("--since {} is not before --until {}", utc_time(request.since_ms), utc_time(until_ms));
    }
    let info = client.flow(request.flow, None).await?;
    let Some(schedule) = info.definition.schedule.clone() else {
        bail!(
            "flow `{}` (version {}) has no schedule: a backfill starts the runs of a schedule's slots (start runs \
             with `flowgrid run start` or `run submit` instead)",
            info.name,
            info.version
        );
    };
    let timetable = Timetable::of(&schedule).map_err(|error| anyhow::anyhow!("the flow's schedule: {error}"))?;
    let Ok(slots) = timetable.slots_between(request.since_ms, until_ms, BACKFILL_SLOTS_MAX) else {
        bail!("the span holds more than {BACKFILL_SLOTS_MAX} slots of the schedule: backfill a shorter span at a time");
    };
    if request.dry_run {
        if session.json {
            print_json(&json!({"flow": info.name, "slots": slots}))?;
        } else {
            for slot in &slots {
                outln!("{}", utc_time(*slot))?;
            }
            eprintln!("{} slots; nothing started (--dry-run)", slots.len());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (mut started, mut existed, mut refused) = (0_usize, 0_usize, Vec::new());
    for chunk in slots.chunks(STARTS_PER_REQUEST) {
        let starts: Vec<StartRun> =
            chunk.iter().map(|slot| StartRun::for_schedule_slot(info.name.clone(), &schedule, *slot)).collect();
        let outcomes = client.start_many(&starts).await.with_context(|| {
            format!(
                "starting the runs of the slots from {} ({started} started so far): run the same backfill again to \
                 go on, the slots that have a run are not started twice",
                utc_time(chunk[0])
            )
        })?;
        for (slot, outcome) in chunk.iter().zip(outcomes) {
            match outcome {
                Ok(run) if run.created => started += 1,
                Ok(_) => existed += 1,
                Err(error) => refused.push((*slot, error.to_string())),
            }
        }
        if !session.json {
            eprintln!(
                "backfill: {} of {} slots ({started} started, {existed} had a run)",
                started + existed,
                slots.len()
            );
        }
    }
    if session.json {
        let refused: Vec<_> = refused.iter().map(|(slot, error)| json!({"slot_ms": slot, "error": error})).collect();
        print_json(&json!({"flow": info.name, "slots": slots.len(), "started": started, "existed": existed,
                           "refused": refused}))?;
    } else {
        let span = match (slots.first(), slots.last()) {
            (Some(first), Some(last)) => format!(" from {} to {}", utc_time(*first), utc_time(*last)),
            _ => String::new(),
        };
        outln!(
            "{} slots of flow {}{span}: {started} runs started, {existed} had a run already, {} refused",
            slots.len(),
            info.name,
            refused.len()
        )?;
        for (slot, error) in &refused {
            outln!("  slot {}: {error}", utc_time(*slot))?;
        }
        if !refused.is_empty() {
            eprintln!("run the same backfill again to start the refused slots: the others are not started twice");
        }
    }
    Ok(if refused.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
