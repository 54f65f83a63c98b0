//! Which shard files the data directory has held: `shard-files`, one file name per line
//! (`shard-00017.redb`), appended once the shard's file exists durably (and for a file
//! already there when a shard is opened). A shard whose file is listed but missing, or
//! holds only zeros, lost what it held after it was written, so it is refused instead of
//! being created again empty: that would drop its runs without a word.
//!
//! Several processes may share a data directory: each line is appended with one `write`
//! to a file opened for appending, so lines never interleave; a file listed twice is
//! harmless. A line cut short (a crash, a full disk) names no file (only a whole name
//! counts, and no name is the start of another). Every append begins with a line break of
//! its own, so another process's line cut short just before it never runs into it, and a
//! short write is an error, not finished by a second write that would land after whatever
//! another process appended meanwhile; empty lines are skipped.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
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
        // A line of its own whatever came before: another process's line cut short may end
        // the list at any moment, so the last byte read first would not do.
        let line = format!("\n{name}\n");
        #[cfg(test)]
        tests::before_append();
        let written = opened.write(line.as_bytes())?;
        if written < line.len() {
            return Err(std::io::Error::new(
                ErrorKind::WriteZero,
                format!(
                    "the line was cut short after {written} of its {} bytes (is the disk full?); free space on the \
                     data directory's disk and open the shard again",
                    line.len()
                ),
            ));
        }
        opened.sync_data()
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    // The shard file's own directory entry first: listed, it must survive a crash (its
    // creation synced its contents, not the entry).
    crate::journal::sync_dir(dir)
        .map_err(|error| backend(PathError::new("sync the directory of the shard file", file, error)))?;
    OpenOptions::new()
        .create(true)
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
    use std::cell::RefCell;

    use super::*;

    thread_local! {
        /// Runs once, just before this thread's next append writes its line: what another
        /// process may append meanwhile.
        static BEFORE_APPEND: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
    }

    pub(super) fn before_append() {
        if let Some(meanwhile) = BEFORE_APPEND.take() {
            meanwhile();
        }
    }

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

    #[test]
    fn a_line_cut_short_by_another_process_just_before_an_append_does_not_swallow_it() {
        let dir = tempfile::tempdir().unwrap();
        let (one, seventeen) = (dir.path().join("shard-00001.redb"), dir.path().join("shard-00017.redb"));
        add(&one).unwrap();
        // Another process's append, cut short by a full disk, lands after this append
        // opened the list and before it writes.
        let list = dir.path().join(FILE_NAME);
        let cut_list = list.clone();
        BEFORE_APPEND.set(Some(Box::new(move || {
            OpenOptions::new().append(true).open(&cut_list).unwrap().write_all(b"shard-000").unwrap();
        })));
        add(&seventeen).unwrap();
        let text = std::fs::read_to_string(&list).unwrap();
        assert!(listed(&seventeen).unwrap(), "shard 17 is not listed: {text:?}");
        assert!(listed(&one).unwrap(), "{text:?}");
    }
}
