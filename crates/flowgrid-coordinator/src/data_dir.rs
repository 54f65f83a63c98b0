//! The embedded store's data directory remembers which grid it belongs to (`grid.json`:
//! its prefix and shard count), so that a coordinator started on it with another
//! `--shards` or `--prefix` is refused before it opens a shard. The grid's settings in
//! NATS say the same while NATS keeps them; this file still says it after NATS lost its
//! store, when a wrong `--shards` would place runs on shards that do not hold them.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::error::{Error, Result};

/// The file in the data directory that names its grid.
const GRID_FILE: &str = "grid.json";

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct GridFile {
    prefix: String,
    shards: u32,
}

/// Refuses a data directory of another grid (another prefix) or shard count. A directory
/// that names no grid yet (a new one, or one written before this file existed) is judged
/// by its shard files: one numbered past `shards` means another count.
pub fn check(dir: &Path, prefix: &str, shards: u32) -> Result<()> {
    let path = dir.join(GRID_FILE);
    let wanted = GridFile { prefix: prefix.to_owned(), shards };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let found: GridFile = serde_json::from_slice(&bytes).map_err(|error| Error::Corrupt {
                what: path.display().to_string(),
                message: format!("{error} (it should read {})", serde_json::to_string(&wanted).unwrap_or_default()),
            })?;
            refuse_other(dir, &found, &wanted)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if let Some(highest) = highest_shard_file(dir)?.filter(|&highest| highest >= shards) {
                return Err(Error::Config(format!(
                    "{} holds shard files up to shard {highest}, so its grid has more than the {shards} shards of \
                     --shards {shards}: start the coordinator with the grid's --shards",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(error) => Err(Error::Config(format!("cannot read {}: {error}", path.display()))),
    }
}

/// The shard count the directory's `grid.json` names, if it names one.
pub fn recorded_shards(dir: &Path) -> Result<Option<u32>> {
    let path = dir.join(GRID_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<GridFile>(&bytes)
            .map(|found| Some(found.shards))
            .map_err(|error| Error::Corrupt { what: path.display().to_string(), message: error.to_string() }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(Error::Config(format!("cannot read {}: {error}", path.display()))),
    }
}

/// Records the grid in a directory that names none yet, once the coordinator was let into
/// the grid (its settings in NATS agree), so that one refused leaves nothing behind. A
/// file it cannot write (a full disk) is left for a later start.
pub fn record(dir: &Path, prefix: &str, shards: u32) {
    let path = dir.join(GRID_FILE);
    if path.exists() {
        return;
    }
    let wanted = GridFile { prefix: prefix.to_owned(), shards };
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, serde_json::to_vec_pretty(&wanted).expect("the grid file encodes")));
    if let Err(error) = written {
        // A full disk, say: the store says so when it needs room, and waits for it.
        let _ = std::fs::remove_file(&path);
        warn!(path = %path.display(), error = %error, "cannot record the grid in its data directory yet");
    }
}

fn refuse_other(dir: &Path, found: &GridFile, wanted: &GridFile) -> Result<()> {
    if found.prefix != wanted.prefix {
        return Err(Error::Config(format!(
            "{} holds the shards of the grid with --prefix {}, not {}: give each grid a data directory of its own \
             (or start this coordinator with --prefix {}; a grid whose prefix was renamed needs its name changed in \
             {} too)",
            dir.display(),
            found.prefix,
            wanted.prefix,
            found.prefix,
            GRID_FILE
        )));
    }
    if found.shards != wanted.shards {
        return Err(Error::Config(format!(
            "the grid in {} has {} shards (fixed when it was created), this coordinator was started with --shards {}: \
             start it with --shards {}",
            dir.display(),
            found.shards,
            wanted.shards,
            found.shards
        )));
    }
    Ok(())
}

/// The highest shard number of the directory's shard files (`shard-00042.redb`), if any.
fn highest_shard_file(dir: &Path) -> Result<Option<u32>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(Error::Config(format!("cannot read {}: {error}", dir.display()))),
    };
    Ok(entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name();
            let number = name.to_str()?.strip_prefix("shard-")?.strip_suffix(".redb")?.parse::<u32>().ok()?;
            Some(number)
        })
        .max())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_remembers_its_grid_and_refuses_another_prefix_or_shard_count() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        check(&data, "orders", 8).expect("a new directory takes the grid");
        assert!(!data.join(GRID_FILE).exists(), "recorded only once the grid let the coordinator in");
        record(&data, "orders", 8);
        check(&data, "orders", 8).expect("and takes it again");
        let error = check(&data, "orders", 16).expect_err("another shard count").to_string();
        assert!(error.contains("has 8 shards") && error.contains("start it with --shards 8"), "{error}");
        let error = check(&data, "billing", 8).expect_err("another grid").to_string();
        assert!(error.contains("--prefix orders, not billing"), "{error}");

        // A directory from before the file: its shard files tell a larger count.
        let old = dir.path().join("old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("shard-00007.redb"), b"").unwrap();
        let error = check(&old, "orders", 4).expect_err("shard 7 of 4").to_string();
        assert!(error.contains("up to shard 7"), "{error}");
        check(&old, "orders", 8).expect("8 shards hold shard 7");
        record(&old, "orders", 8);
        record(&old, "orders", 16);
        let error = check(&old, "orders", 16).expect_err("the first record stays").to_string();
        assert!(error.contains("has 8 shards"), "{error}");
    }
}
