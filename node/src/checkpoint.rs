//! The run folder's checkpoints: atomic writes, the `checkpoints.jsonl` index, and finding
//! the newest complete checkpoint.
//!
//! A checkpoint is written into `checkpoints/.tmp-step-N-<pid>/`, every file and folder in
//! it is fsynced, it is renamed to `checkpoints/step-N/`, the `checkpoints/` folder is
//! fsynced, and only then is a line appended (and fsynced) to `checkpoints.jsonl`. So a
//! crash at any moment leaves either no trace of the new checkpoint but a temp folder
//! (removed on the next start), or a renamed folder that is not yet listed (ignored, and
//! replaced if that step is written again), or a complete listed checkpoint. Readers trust
//! only listed checkpoints whose folder exists.
//!
//! This module knows nothing of what is inside a checkpoint: the caller fills the folder.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, Error, Result};

/// Environment variable for tests: `RINGTUNE_TEST_PAUSE_IN_CHECKPOINT=N` makes the writer
/// stop for a long time after filling and syncing the temp folder of step N but before the
/// rename, after printing a marker line to stderr, so a test can kill the process in the
/// middle of a checkpoint write.
pub const PAUSE_ENV: &str = "RINGTUNE_TEST_PAUSE_IN_CHECKPOINT";

/// The marker printed to stderr when pausing (followed by the step).
pub const PAUSE_MARKER: &str = "ringtune-test: paused inside checkpoint write of step";

/// One line of `checkpoints.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The optimiser steps taken when it was written.
    pub step: u64,
    /// Folder of the checkpoint, relative to the run folder (`checkpoints/step-N`).
    pub path: String,
    /// The PEFT adapter folder inside it, relative to the run folder.
    pub adapter: String,
    /// Training loss of the step it was written after.
    pub loss: Option<f64>,
    /// Seconds since the Unix epoch when it became complete.
    pub unix_time: u64,
}

/// A run folder taken by [`RunDir::lock`]; dropping it releases the folder, and removes
/// it if the lock created it and the run wrote nothing into it (a run refused for bad
/// input leaves no folder behind).
#[derive(Debug)]
pub struct RunLock {
    file: Option<fs::File>,
    created: Option<PathBuf>,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let Some(root) = self.created.take() else {
            return;
        };
        let only_lock = fs::read_dir(&root).is_ok_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .all(|e| e.file_name() == ".lock")
        });
        if only_lock {
            let _ = fs::remove_file(root.join(".lock"));
            let _ = fs::remove_dir(&root);
        }
        drop(self.file.take());
    }
}

/// A run's output folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Uses (and creates, with `checkpoints/`) the folder `root`.
    pub fn create(root: &Path) -> Result<Self> {
        let ck = root.join("checkpoints");
        fs::create_dir_all(&ck).map_err(io_err(&ck))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The run folder if it exists (nothing is created).
    pub fn open_existing(root: &Path) -> Result<Option<Self>> {
        Ok(root.is_dir().then(|| Self {
            root: root.to_owned(),
        }))
    }

    /// Whether `root` holds a complete checkpoint to resume from (`--auto-resume`).
    pub fn has_checkpoint(root: &Path) -> Result<bool> {
        match Self::open_existing(root)? {
            Some(run) => Ok(run.latest_checkpoint()?.is_some()),
            None => Ok(false),
        }
    }

    /// The run folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `checkpoints/` inside it.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// `checkpoints.jsonl` inside it.
    pub fn index_path(&self) -> PathBuf {
        self.root.join("checkpoints.jsonl")
    }

    /// `metrics.jsonl` inside it.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// The folder of step `step`'s checkpoint.
    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.checkpoints_dir().join(format!("step-{step}"))
    }

    /// Every listed checkpoint whose folder exists, in file order (ascending step). A torn
    /// last line (a crash mid-append) is skipped; a torn line elsewhere is an error.
    pub fn complete_checkpoints(&self) -> Result<Vec<CheckpointRecord>> {
        let path = self.index_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let lines: Vec<&str> = text.lines().collect();
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<CheckpointRecord>(line) {
                Ok(rec) => {
                    if self.root.join(&rec.path).is_dir() {
                        out.push(rec);
                    }
                }
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
                Err(e) => {
                    return Err(Error::Corrupt {
                        path: path.clone(),
                        line: i + 1,
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(out)
    }

    /// Whether the folder holds a run's checkpoints: listed ones or, when there is no
    /// `checkpoints.jsonl` at all (deleted or lost), any `step-N` folder. A fresh start must
    /// not overwrite either. (With an index, an unlisted folder is an interrupted write's
    /// leftover, which a start cleans up.)
    pub fn holds_checkpoints(&self) -> Result<bool> {
        if self.index_path().exists() {
            return Ok(!self.complete_checkpoints()?.is_empty());
        }
        let ck = self.checkpoints_dir();
        let entries = match fs::read_dir(&ck) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(&ck)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&ck))?;
            if entry.file_name().to_string_lossy().starts_with("step-") && entry.path().is_dir() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Takes the folder for this process (creating it): an exclusive lock on `.lock`
    /// inside it, held until the returned guard drops (or the process ends, however it
    /// ends). A second run into the same folder — which would interleave metrics.jsonl
    /// and overwrite checkpoints — is refused naming the holder's pid. Where the file
    /// system has no locks, a warning, and the run goes on unlocked.
    pub fn lock(root: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::io::AsRawFd;
        let created = (!root.exists()).then(|| root.to_owned());
        fs::create_dir_all(root).map_err(io_err(root))?;
        let path = root.join(".lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::Invalid(format!(
                    "{} is in use by another ringtune run{}: wait for it to end, or choose \
                     another output_dir",
                    root.display(),
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {holder})")
                    }
                )));
            }
            eprintln!(
                "warning: cannot lock {} ({e}); nothing stops a second run from using the \
                 same folder",
                path.display()
            );
            return Ok(RunLock {
                file: None,
                created,
            });
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        Ok(RunLock {
            file: Some(file),
            created,
        })
    }

    /// The newest complete checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<CheckpointRecord>> {
        Ok(self
            .complete_checkpoints()?
            .into_iter()
            .max_by_key(|r| r.step))
    }

    /// Removes what interrupted writes left behind: temp folders, step folders that were
    /// renamed but never listed, and the temp files of the run folder's own atomic
    /// rewrites (`checkpoints.jsonl`, `metrics.jsonl`). Rewrites the index without a torn
    /// last line so the next append starts on a fresh line. Returns how many entries were
    /// removed.
    pub fn clean_incomplete(&self) -> Result<usize> {
        let listed = self.complete_checkpoints()?;
        let mut removed = 0;
        for entry in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let entry = entry.map_err(io_err(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = [".tmp-checkpoints.jsonl-", ".tmp-metrics.jsonl-"]
                .iter()
                .any(|p| name.starts_with(p));
            if ours && entry.file_type().map_err(io_err(&entry.path()))?.is_file() {
                fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
                removed += 1;
            }
        }
        // Rewrite the index from its parsed records (drops a torn tail line).
        if self.index_path().exists() {
            let mut text = String::new();
            for r in &listed {
                text.push_str(&serde_json::to_string(r).expect("record serializes"));
                text.push('\n');
            }
            write_file_atomic(&self.index_path(), text.as_bytes())?;
        }
        let ck = self.checkpoints_dir();
        for entry in fs::read_dir(&ck).map_err(io_err(&ck))? {
            let entry = entry.map_err(io_err(&ck))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = format!("checkpoints/{name}");
            let stale = name.starts_with(".tmp-")
                || name.starts_with(".old-")
                || (name.starts_with("step-") && !listed.iter().any(|r| r.path == rel));
            if stale {
                fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Writes step `step`'s checkpoint atomically. `fill` writes the files into the folder
    /// it is given (a temp folder); `record` is completed with the paths and appended to
    /// `checkpoints.jsonl` once the folder is in place. Returns the final folder.
    pub fn write_checkpoint(
        &self,
        step: u64,
        loss: Option<f64>,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<CheckpointRecord> {
        let ck = self.checkpoints_dir();
        let tmp = ck.join(format!(".tmp-step-{step}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        fill(&tmp)?;
        sync_tree(&tmp)?;
        pause_if_asked(step);

        let dest = self.step_dir(step);
        if dest.exists() {
            // Same step written again (after resuming from an older checkpoint): move the old
            // one aside first, because rename() will not replace a non-empty folder.
            let old = ck.join(format!(".old-step-{step}-{}", std::process::id()));
            fs::rename(&dest, &old).map_err(io_err(&dest))?;
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        sync_dir(&ck)?;

        let rel = format!("checkpoints/step-{step}");
        let rec = CheckpointRecord {
            step,
            adapter: format!("{rel}/adapter"),
            path: rel,
            loss,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let index = self.index_path();
        let mut line = serde_json::to_string(&rec).expect("record serializes");
        line.push('\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&index)
            .map_err(io_err(&index))?;
        f.write_all(line.as_bytes()).map_err(io_err(&index))?;
        f.sync_all().map_err(io_err(&index))?;
        sync_dir(&self.root)?;
        Ok(rec)
    }
}

fn pause_if_asked(step: u64) {
    if let Ok(v) = std::env::var(PAUSE_ENV) {
        if v.trim().parse::<u64>().ok() == Some(step) {
            eprintln!("{PAUSE_MARKER} {step}");
            std::thread::sleep(std::time::Duration::from_secs(300));
        }
    }
}

/// Writes a file atomically: a temp file in the same folder, fsync, rename, fsync folder.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("file".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

/// fsyncs every file and folder under `dir` (and `dir` itself).
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let p = entry.path();
        let ty = entry.file_type().map_err(io_err(&p))?;
        if ty.is_dir() {
            sync_tree(&p)?;
        } else {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&p))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill_with(text: &'static str) -> impl FnOnce(&Path) -> Result<()> {
        move |d: &Path| {
            fs::create_dir_all(d.join("adapter")).map_err(io_err(d))?;
            fs::write(d.join("adapter/x"), text).map_err(io_err(d))?;
            Ok(())
        }
    }

    #[test]
    fn a_lock_refuses_a_second_holder_and_a_folder_it_made_goes_when_left_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run");
        let lock = RunDir::lock(&root).unwrap();
        let e = RunDir::lock(&root).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "in use by another ringtune run (pid {})",
                std::process::id()
            )),
            "{e}"
        );
        drop(lock);
        assert!(!root.exists(), "the empty folder the lock made should go");
        // A folder the run wrote into stays, and can be taken again.
        let lock = RunDir::lock(&root).unwrap();
        fs::write(root.join("metrics.jsonl"), "").unwrap();
        drop(lock);
        assert!(root.join("metrics.jsonl").exists());
        drop(RunDir::lock(&root).unwrap());
    }

    #[test]
    fn unlisted_step_folders_count_as_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path()).unwrap();
        assert!(!run.holds_checkpoints().unwrap());
        fs::create_dir_all(run.checkpoints_dir().join(".tmp-step-3-1")).unwrap();
        assert!(
            !run.holds_checkpoints().unwrap(),
            "an unfinished write is not a checkpoint"
        );
        fs::create_dir_all(run.step_dir(3)).unwrap();
        assert!(run.holds_checkpoints().unwrap());
        // With an index, only what it lists counts (an unlisted folder is a crash's
        // leftover between the rename and the append).
        fs::write(run.index_path(), "").unwrap();
        assert!(!run.holds_checkpoints().unwrap());
    }

    #[test]
    fn write_list_and_find_latest() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::create(t.path()).unwrap();
        assert_eq!(run.latest_checkpoint().unwrap(), None);
        run.write_checkpoint(2, Some(1.5), fill_with("a")).unwrap();
        let r = run.write_checkpoint(4, None, fill_with("b")).unwrap();
        assert_eq!(r.path, "checkpoints/step-4");
        assert_eq!(r.adapter, "checkpoints/step-4/adapter");
        let all = run.complete_checkpoints().unwrap();
        assert_eq!(all.iter().map(|r| r.step).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(all[0].loss, Some(1.5));
        assert_eq!(run.latest_checkpoint().unwrap().unwrap().step, 4);
        assert_eq!(
            fs::read_to_string(t.path().join("checkpoints/step-4/adapter/x")).unwrap(),
            "b"
        );
        // No temp folders left.
        let names: Vec<_> = fs::read_dir(run.checkpoints_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
    }

    #[test]
    fn interrupted_writes_are_ignored_then_cleaned() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::create(t.path()).unwrap();
        run.write_checkpoint(2, None, fill_with("a")).unwrap();
        // A temp folder (crash before rename), a renamed but unlisted folder (crash before
        // the append), and a torn index line (crash mid-append).
        fs::create_dir_all(run.checkpoints_dir().join(".tmp-step-4-1/adapter")).unwrap();
        fs::create_dir_all(run.checkpoints_dir().join("step-6/adapter")).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(run.index_path())
            .unwrap();
        f.write_all(b"{\"step\":6,\"pa").unwrap();
        drop(f);
        // And the temp files of the run folder's own rewrites (a kill mid-rewrite); a
        // file of the user's that merely looks alike stays.
        fs::write(t.path().join(".tmp-metrics.jsonl-77"), "x").unwrap();
        fs::write(t.path().join(".tmp-checkpoints.jsonl-77"), "x").unwrap();
        fs::write(t.path().join(".tmp-notes.txt-77"), "x").unwrap();
        assert_eq!(run.latest_checkpoint().unwrap().unwrap().step, 2);
        assert_eq!(run.clean_incomplete().unwrap(), 4);
        assert!(!t.path().join(".tmp-metrics.jsonl-77").exists());
        assert!(!t.path().join(".tmp-checkpoints.jsonl-77").exists());
        assert!(t.path().join(".tmp-notes.txt-77").exists());
        assert!(!run.step_dir(6).exists());
        assert!(run.step_dir(2).join("adapter/x").exists());
        // The next append lands on its own line.
        run.write_checkpoint(6, None, fill_with("c")).unwrap();
        let steps: Vec<u64> = run
            .complete_checkpoints()
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(steps, vec![2, 6]);
    }

    #[test]
    fn rewriting_a_step_replaces_it() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::create(t.path()).unwrap();
        run.write_checkpoint(2, None, fill_with("a")).unwrap();
        run.write_checkpoint(2, None, fill_with("z")).unwrap();
        assert_eq!(
            fs::read_to_string(run.step_dir(2).join("adapter/x")).unwrap(),
            "z"
        );
    }

    #[test]
    fn corrupt_middle_line_is_an_error_naming_the_line() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::create(t.path()).unwrap();
        run.write_checkpoint(2, None, fill_with("a")).unwrap();
        let mut text = fs::read_to_string(run.index_path()).unwrap();
        text.insert_str(0, "garbage\n");
        fs::write(run.index_path(), text).unwrap();
        let e = run.complete_checkpoints().unwrap_err().to_string();
        assert!(e.contains("checkpoints.jsonl") && e.contains(":1"), "{e}");
    }

    #[test]
    fn failed_fill_leaves_no_listed_checkpoint() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::create(t.path()).unwrap();
        let r = run.write_checkpoint(2, None, |_| Err(Error::Invalid("boom".into())));
        assert!(r.is_err());
        assert_eq!(run.latest_checkpoint().unwrap(), None);
        assert!(!run.step_dir(2).exists());
    }
}
