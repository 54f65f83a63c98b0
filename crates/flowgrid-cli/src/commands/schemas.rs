//! `flowgrid schemas [--out DIR] [--check]`: the JSON Schemas of the wire messages.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::args::SchemasArgs;

pub(crate) fn schemas(args: &SchemasArgs) -> anyhow::Result<ExitCode> {
    let expected = generated()?;
    if args.check {
        return check(&args.out, &expected);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut written = 0;
    for (name, text) in &expected {
        let path = args.out.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
            written += 1;
        }
    }
    eprintln!("{} schemas in {} ({written} updated)", expected.len(), args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Every schema file as it should read: pretty JSON with a trailing newline.
fn generated() -> anyhow::Result<Vec<(&'static str, String)>> {
    flowgrid_proto::schemas()
        .into_iter()
        .map(|(name, schema)| {
            let text = serde_json::to_string_pretty(&schema).with_context(|| format!("cannot render {name}"))?;
            Ok((name, text + "\n"))
        })
        .collect()
}

fn check(dir: &Path, expected: &[(&'static str, String)]) -> anyhow::Result<ExitCode> {
    let mut problems = Vec::new();
    for (name, text) in expected {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(existing) if existing == *text => {}
            Ok(_) => problems.push(format!("{}: drifted from the Rust types", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                problems.push(format!("{}: missing", path.display()))
            }
            Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    if problems.is_empty() {
        eprintln!("{} schemas in {} are up to date", expected.len(), dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    eprintln!("{} schema file(s) out of date: run `make schemas`", problems.len());
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_schemas_pass_the_check_and_an_edit_fails_it() {
        let dir = tempfile::tempdir().unwrap();
        let args = SchemasArgs { out: dir.path().join("schemas"), check: false };
        assert_eq!(schemas(&args).unwrap(), ExitCode::SUCCESS);
        let expected = generated().unwrap();
        assert_eq!(check(&args.out, &expected).unwrap(), ExitCode::SUCCESS);
        let (name, _) = expected[0];
        std::fs::write(args.out.join(name), "{}\n").unwrap();
        assert_eq!(check(&args.out, &expected).unwrap(), ExitCode::FAILURE);
        std::fs::remove_file(args.out.join(name)).unwrap();
        assert_eq!(check(&args.out, &expected).unwrap(), ExitCode::FAILURE);
    }

    #[test]
    fn schema_files_end_with_a_newline() {
        for (name, text) in generated().unwrap() {
            assert!(text.ends_with("}\n"), "{name}");
        }
    }
}
