//! `flowgrid flow deploy | check | test | diff | list | show | pause | resume | limits | backfill`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use flowgrid_model::{parse_definition, Evaluator, FlowDefinition, FlowPlan, Limits};

use flowgrid_proto::FlowDeployed;
use flowgrid_sdk::trigger_stream::{check_trigger_stream, trigger_loop, TriggerStreamError};
use flowgrid_sdk::Client;

use crate::args::FlowCommand;
use crate::output::{out, outln, print_json, utc_time, Table};
use crate::Session;

pub(crate) async fn dispatch(command: FlowCommand, client: &Client, session: &Session) -> anyhow::Result<ExitCode> {
    match command {
        FlowCommand::Deploy { files } => return deploy(&files, client, session).await,
        FlowCommand::List => {
            let list = client.flows().await?;
            if session.json {
                print_json(&list)?;
            } else if list.flows.is_empty() {
                eprintln!("no flows deployed yet; deploy one with `flowgrid flow deploy FILE`");
            } else {
                let mut table = Table::new(&["NAME", "LATEST", "STEPS", "STARTED BY", "DEPLOYED", "DESCRIPTION"]);
                for flow in &list.flows {
                    table.row(vec![
                        flow.name.clone(),
                        flow.latest_version.to_string(),
                        flow.steps.to_string(),
                        crate::output::started_by(flow),
                        utc_time(flow.deployed_ms),
                        flow.description.clone().unwrap_or_default(),
                    ]);
                }
                out!("{}", table.render())?;
            }
        }
        FlowCommand::Limits { name } => {
            if let Some(name) = &name {
                // A misspelt flow has no limit in use either: say it is not there.
                client.flow(name, None).await?;
            }
            let list = client.limits(name.as_deref()).await?;
            if session.json {
                print_json(&list)?;
            } else if list.limits.is_empty() {
                eprintln!("no concurrency limit in use: no run of a limited flow is going or queued");
            } else {
                out!("{}", crate::output::limit_table(&list).render())?;
                if list.more > 0 {
                    eprintln!("{} more limits in use not shown (the busiest are)", list.more);
                }
            }
        }
        FlowCommand::Check { files } => return check(&files, session),
        FlowCommand::Test { definition, cases } => return super::simulate::test(&definition, &cases, session),
        FlowCommand::Backfill { name, since, until, dry_run } => {
            let request = super::backfill::Backfill { flow: &name, since_ms: since, until_ms: until, dry_run };
            return super::backfill::backfill(client, request, session).await;
        }
        FlowCommand::Pause { name, reason } => print_paused(&client.pause_flow(&name, reason).await?, session)?,
        FlowCommand::Resume { name, reason } => print_paused(&client.resume_flow(&name, reason).await?, session)?,
        FlowCommand::Diff { name, file, version, to } => {
            // As diff(1): 1 says they differ, so a comparison that could not be made exits 2.
            return Ok(match diff(client, &name, file, version, to, session).await {
                Ok(code) => code,
                Err(error) => {
                    crate::failure::report(&error, session);
                    ExitCode::from(crate::failure::EXIT_INVALID)
                }
            });
        }
        FlowCommand::Show { name, version } => {
            let info = client.flow(&name, version).await?;
            if session.json {
                print_json(&info.definition)?;
            } else {
                let yaml = definition_yaml(&info.definition)?;
                outln!("# flow {} version {}, deployed {}", info.name, info.version, utc_time(info.deployed_ms))?;
                out!("{yaml}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_paused(paused: &flowgrid_sdk::FlowPaused, session: &Session) -> anyhow::Result<()> {
    if session.json {
        return print_json(paused);
    }
    let state = match (paused.paused, paused.applied) {
        (true, _) => "paused: its schedule and trigger start no runs",
        (false, true) => "resumed: its schedule and trigger start runs again",
        (false, false) => "not paused",
    };
    let change = if paused.applied { "" } else { " (it was already; nothing changed)" };
    outln!("flow {} is {state}{change}", paused.name)?;
    Ok(())
}

/// Prints how `file` (or deployed version `to`) differs from deployed version `version`
/// (default: the latest) of flow `name`, both written as `flow show` writes them; exit 1
/// when they differ. A file is compared as a deploy would store it, with its defaults
/// written in ([`flowgrid_model::with_deploy_defaults`]), so a file a deploy answers
/// unchanged is the same; one that differs and that a deploy would refuse is an error.
async fn diff(
    client: &Client,
    name: &str,
    file: Option<PathBuf>,
    version: Option<u32>,
    to: Option<u32>,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    let deployed = client.flow(name, version).await?;
    let old_label = format!("{name}@{} (deployed)", deployed.version);
    let (new_definition, new_label) = match (file, to) {
        (_, Some(to)) => (client.flow(name, Some(to)).await?.definition, format!("{name}@{to} (deployed)")),
        (Some(file), None) => {
            let text = super::read_text(&file)?;
            let definition = parse_definition(&text, &Limits::default())
                .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
            anyhow::ensure!(
                definition.name == name,
                "{} defines flow `{}`, not `{name}`: compare it with its own flow",
                file.display(),
                definition.name
            );
            let definition = flowgrid_model::with_deploy_defaults(definition);
            if definition != deployed.definition {
                // A deploy checks a new version only: the deployed one, sent again, is unchanged.
                let limits = Limits::default();
                if let Err(problems) = deploy_checks(definition.clone(), &Evaluator::new(&limits), &limits) {
                    anyhow::bail!(
                        "{}: a deploy would refuse it, {} problem(s):\n  {}\nfix them (`flowgrid flow check` lists \
                         them too) and compare again",
                        file.display(),
                        problems.len(),
                        problems.join("\n  ")
                    );
                }
            }
            (definition, file.display().to_string())
        }
        (None, None) => anyhow::bail!("give a definition file, or --to VERSION to compare two deployed versions"),
    };
    let old = definition_yaml(&deployed.definition)?;
    let new = definition_yaml(&new_definition)?;
    let same = old == new;
    let text = similar::TextDiff::from_lines(&old, &new).unified_diff().header(&old_label, &new_label).to_string();
    if session.json {
        print_json(&json!({"same": same, "from": old_label, "to": new_label, "diff": text}))?;
    } else if same {
        outln!("{new_label} is the same as {old_label}")?;
    } else {
        out!("{text}")?;
    }
    Ok(if same { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A definition as `flow show` prints it (and `flow diff` compares it).
fn definition_yaml(definition: &FlowDefinition) -> anyhow::Result<String> {
    serde_norway::to_string(definition).context("cannot write the definition as YAML")
}

/// Deploys `files` in order. Several are all checked first, as `flow check` does and, on
/// the grid's NATS, as the deploy checks a trigger's stream; none is deployed if one has a
/// problem or two define the same flow; a deploy the grid refuses stops the rest, and the
/// error says which were deployed.
async fn deploy(files: &[PathBuf], client: &Client, session: &Session) -> anyhow::Result<ExitCode> {
    let texts = if let [file] = files {
        vec![super::read_text(file)?]
    } else {
        crate::ensure_usage!(
            !files.iter().any(|file| file.as_os_str() == "-"),
            "`-` (a definition on stdin) is deployed alone: give it as the only file"
        );
        let mut checks = check_files(files);
        for (_, checked) in &mut checks {
            let Ok((text, _, _)) = checked else { continue };
            if let Some(problem) = trigger_problem(client, text).await {
                *checked = Err(vec![problem]);
            }
        }
        if checks.iter().any(|(_, checked)| checked.is_err()) {
            // Exit 2, as for one file the grid refuses: a definition is invalid.
            print_checks(&checks, session)?;
            eprintln!("error: nothing deployed: fix the files with problems (above) and deploy them all again");
            return Ok(ExitCode::from(crate::failure::EXIT_INVALID));
        }
        let mut flows: HashMap<&str, &str> = HashMap::new();
        let mut texts = Vec::with_capacity(files.len());
        for (file, checked) in &checks {
            let Ok((text, name, _)) = checked else { unreachable!("files with problems were reported above") };
            if let Some(other) = flows.insert(name, file) {
                // Bad usage (exit 2), and under --json an answer as any failure's.
                return Err(anyhow::Error::new(crate::failure::Usage(format!(
                    "nothing deployed: {other} and {file} both define flow {name}; deploy one of them"
                ))));
            }
            texts.push(text.clone());
        }
        texts
    };
    let mut deployed = Vec::with_capacity(files.len());
    for (file, text) in files.iter().zip(texts) {
        let flow = client.deploy(text).await.map_err(|error| {
            let done: Vec<String> = deployed.iter().map(|flow: &FlowDeployed| flow.name.clone()).collect();
            let done = if done.is_empty() { "none".to_owned() } else { done.join(", ") };
            anyhow::Error::new(error).context(format!("{} not deployed (deployed before it: {done})", file.display()))
        })?;
        if !session.json {
            if flow.created {
                outln!("deployed {} version {}", flow.name, flow.version)?;
            } else {
                outln!("{} version {} is unchanged (identical to the latest version)", flow.name, flow.version)?;
            }
        }
        deployed.push(flow);
    }
    if session.json {
        match deployed.as_slice() {
            [flow] => print_json(flow)?,
            several => print_json(&several)?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The problem, if any, for which the grid would refuse the trigger of a definition
/// (`text`, already checked) on its NATS ([`check_trigger_stream`], [`trigger_loop`]): asked
/// before any of several files is deployed, since the grid would refuse that file only after
/// deploying those before it. A lookup NATS does not answer is left to the deploy, which
/// looks again.
async fn trigger_problem(client: &Client, text: &str) -> Option<String> {
    let definition = parse_definition(text, &Limits::default()).ok()?;
    let trigger = definition.trigger.as_ref()?;
    if let Some(issue) = trigger_loop(client.subjects(), &definition) {
        return Some(issue.to_string());
    }
    let consumer = client.subjects().trigger_consumer(&definition.name);
    match check_trigger_stream(client.jetstream(), trigger, &consumer).await {
        Err(TriggerStreamError::Refused(issue)) => Some(issue.to_string()),
        Ok(()) | Err(TriggerStreamError::Lookup { .. }) => None,
    }
}

/// Each file's text, flow name and step count, or its problems, each with its path.
type Checked = Result<(String, String, usize), Vec<String>>;

fn check_files(files: &[PathBuf]) -> Vec<(String, Checked)> {
    let limits = Limits::default();
    let evaluator = Evaluator::new(&limits);
    let check = |file: &PathBuf| -> Checked {
        let text = super::read_text(file).map_err(|error| vec![format!("definition: {error:#}")])?;
        let definition = parse_definition(&text, &limits).map_err(issues)?;
        let plan = deploy_checks(definition, &evaluator, &limits)?;
        let (name, steps) = (plan.name.clone(), plan.steps.len());
        Ok((text, name, steps))
    };
    files.iter().map(|file| (file.display().to_string(), check(file))).collect()
}

/// What a deploy checks of a new version of a parsed definition: the rules for new
/// deployments and the compile, both lists of problems at once.
fn deploy_checks(definition: FlowDefinition, evaluator: &Evaluator, limits: &Limits) -> Result<FlowPlan, Vec<String>> {
    let new_rules = flowgrid_model::check_new(&definition, evaluator, limits).map_err(issues);
    let plan = FlowPlan::compile(definition, 1, evaluator, limits).map_err(issues);
    match (plan, new_rules) {
        (Ok(plan), Ok(())) => Ok(plan),
        (Err(mut problems), Err(more)) => {
            problems.extend(more);
            Err(problems)
        }
        (Err(problems), Ok(())) | (Ok(_), Err(problems)) => Err(problems),
    }
}

/// `flow check`: parses and compiles each file as a deploy would, with the default limits;
/// exit 2 if any file has a problem.
pub(crate) fn check(files: &[PathBuf], session: &Session) -> anyhow::Result<ExitCode> {
    let reports = check_files(files);
    print_checks(&reports, session)?;
    let valid = reports.iter().all(|(_, checked)| checked.is_ok());
    // Exit 2, an invalid definition, as `flow deploy` of several files exits for them.
    Ok(if valid { ExitCode::SUCCESS } else { ExitCode::from(crate::failure::EXIT_INVALID) })
}

/// Prints what `flow check` found, a line per file (an array with `--json`).
fn print_checks(reports: &[(String, Checked)], session: &Session) -> anyhow::Result<()> {
    if session.json {
        let reports: Vec<_> = reports
            .iter()
            .map(|(file, checked)| match checked {
                Ok((_, name, steps)) => json!({"file": file, "valid": true, "flow": name, "steps": steps}),
                Err(problems) => json!({"file": file, "valid": false, "problems": problems}),
            })
            .collect();
        print_json(&reports)?;
    } else {
        for (file, checked) in reports {
            match checked {
                Ok((_, name, steps)) => outln!("ok       {file}: flow {name}, {steps} step(s)")?,
                Err(problems) => {
                    outln!("invalid  {file}: {} problem(s)", problems.len())?;
                    for problem in problems {
                        outln!("  {problem}")?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn issues(error: flowgrid_model::DefinitionError) -> Vec<String> {
    error.issues().iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_passes_the_bundled_flows_and_fails_a_file_with_problems() {
        let session = Session {
            nats_url: String::new(),
            nats_options: Default::default(),
            prefix: "flowgrid".into(),
            json: true,
        };
        let bundled: Vec<PathBuf> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/flows"))
            .expect("the bundled flows")
            .map(|entry| entry.expect("a directory entry").path())
            .collect();
        assert!(bundled.len() >= 5, "{bundled:?}");
        assert_eq!(check(&bundled, &session).unwrap(), ExitCode::SUCCESS);

        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "name: bad\nsteps:\n  - { id: b, kind: transform, after: [zz], output: '1' }\n").unwrap();
        let invalid = ExitCode::from(crate::failure::EXIT_INVALID);
        assert_eq!(check(&[bundled[0].clone(), bad], &session).unwrap(), invalid);
        assert_eq!(check(&[dir.path().join("missing.yaml")], &session).unwrap(), invalid);
    }
}
