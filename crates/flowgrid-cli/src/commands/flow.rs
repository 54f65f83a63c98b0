//! `flowgrid flow deploy | list | show`.

use std::process::ExitCode;

use anyhow::Context;

use flowgrid_sdk::Client;

use crate::args::FlowCommand;
use crate::output::{out, outln, print_json, utc_time, Table};
use crate::Session;

pub(crate) async fn dispatch(command: FlowCommand, client: &Client, session: &Session) -> anyhow::Result<ExitCode> {
    match command {
        FlowCommand::Deploy { file } => {
            let definition = super::read_text(&file)?;
            let deployed = client.deploy(definition).await?;
            if session.json {
                print_json(&deployed)?;
            } else if deployed.created {
                outln!("deployed {} version {}", deployed.name, deployed.version)?;
            } else {
                outln!(
                    "{} version {} is unchanged (identical to the latest version)",
                    deployed.name,
                    deployed.version
                )?;
            }
        }
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
        FlowCommand::Show { name, version } => {
            let info = client.flow(&name, version).await?;
            if session.json {
                print_json(&info.definition)?;
            } else {
                let yaml = serde_norway::to_string(&info.definition).context("cannot write the definition as YAML")?;
                outln!("# flow {} version {}, deployed {}", info.name, info.version, utc_time(info.deployed_ms))?;
                out!("{yaml}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
