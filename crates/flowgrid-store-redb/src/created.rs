//! Which shard files the data directory has held: `shard-files`, one file name per line
//! (`shard-00017.redb`), appended once the shard's file exists durably (and for a file
//! already there when a shard is opened). A shard whose file is listed but missing, or
//! holds only zeros, lost what it held after it was written, so it is refused instead of
//! being created again empty: that would drop its runs without a word.
//!
//! Several processes may share a data directory: each line is appended with one `write`
//! to a file opened for appending, so lines never interleave; a file listed twice is
//! harmless. A line cut short by a crash names no file (only a whole name counts, and no
//! name is the start of another), and the next append begins a line of its own.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use flowgrid_store::{Error, Result};

use crate::{backend, PathError};

/// The list's name in the data directory.
pub(crate) const FILE_NAME: &str = "shard-files";

/// The list of the data directory holding `file`, and the line that names `file`.
fn list_and_name(file: &Path) -> (PathBuf, String) {
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = file.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    (dir.join(FILE_NAME), name)
}

/// True when the data directory's list names the shard file `file`.
pub(crate) fn listed(file: &Path) -> Result<bool> {
    let (list, name) = list_and_name(file);
    match std::fs::read(&list) {
        Ok(text) => Ok(text.split(|&byte| byte == b'\n').any(|line| line == name.as_bytes())),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(false),
        Err(error) => Err(backend(PathError::new("read the list of shard files", &list, error))),
    }
}

/// Adds the shard file `file` to its data directory's list, durably.
pub(crate) fn add(file: &Path) -> Result<()> {
    let (list, name) = list_and_name(file);
    let fresh = !list.exists();
    let append = |mut opened: File| -> std::io::Result<()> {
        // After a line cut short, a line of its own.
        let length = opened.metadata()?.len();
        let mut last = [b'\n'];
        if length > 0 {
            opened.read_exact_at(&mut last, length - 1)?;
        }
        let start = if last[0] == b'\n' { "" } else { "\n" };
        opened.write_all(format!("{start}{name}\n").as_bytes())?;
        opened.sync_data()
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    // The shard file's own directory entry first: listed, it must survive a crash (its
    // creation synced its contents, not the entry).
    crate::journal::sync_dir(dir)
        .map_err(|error| backend(PathError::new("sync the directory of the shard file", file, error)))?;
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&list)
        .and_then(append)
        // A list just made must survive a crash too: its directory entry is synced.
        .and_then(|()| if fresh { crate::journal::sync_dir(dir) } else { Ok(()) })
        .map_err(|error| backend(PathError::new("add to the list of shard files", &list, error)))
}

/// The refusal of a listed shard file that is gone or was wiped (`what` says which).
pub(crate) fn lost(file: &Path, what: &str) -> Error {
    let (list, name) = list_and_name(file);
    Error::Corrupt {
        key: file.display().to_string(),
        detail: format!(
            "the shard file {what}, but this data directory held it ({} lists it): the shard is not served, as \
             creating it again empty would lose its runs. Put the file back (restore the whole data directory from \
             one backup); or, to start this shard over empty and give up what it held, delete the file if there is \
             one and remove the line `{name}` from {FILE_NAME}",
            list.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_names_count_and_a_cut_line_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (one, seventeen, three) = (
            dir.path().join("shard-00001.redb"),
            dir.path().join("shard-00017.redb"),
            dir.path().join("shard-00003.redb"),
        );
        assert!(!listed(&one).unwrap());
        add(&seventeen).unwrap();
        add(&seventeen).unwrap();
        assert!(listed(&seventeen).unwrap());
        assert!(!listed(&one).unwrap());
        // A crash in the middle of an append leaves a line cut short, here one that
        // begins like shard 1's name.
        let list = dir.path().join(FILE_NAME);
        OpenOptions::new().append(true).open(&list).unwrap().write_all(b"shard-0000").unwrap();
        assert!(!listed(&one).unwrap());
        add(&three).unwrap();
        assert!(listed(&three).unwrap(), "{:?}", std::fs::read_to_string(&list));
        assert!(!listed(&one).unwrap());
    }
}
