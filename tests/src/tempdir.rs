//! Scratch directories under the system temp dir, named after the test and the process so
//! that parallel test binaries never share one.

use std::{
    path::{Path, PathBuf},
    sync::{
        Mutex, Once,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

/// The directories [`temp_dir`] made in this process, swept when it exits.
static MADE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Whether anything in this process panicked (a failed assertion): its directories stay.
static PANICKED: AtomicBool = AtomicBool::new(false);

/// A fresh, empty directory `gateway-test-LABEL-PID-N` under the system temp dir. It stays
/// while the process runs; when the test binary exits, it is removed if nothing in the process
/// panicked, and kept (with its config and logs, for a look) if something did: the paths are
/// printed then. [`TempDir`] is removed on drop.
pub fn temp_dir(label: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "gateway-test-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    sweep_at_exit(&d);
    d
}

/// Registers `dir` for [`sweep`] when the process exits (libtest's `main` returns, or calls
/// `exit` with the failure status: both run `atexit` handlers). The first call also wraps
/// the panic hook, which marks the process as failed before it prints as before.
fn sweep_at_exit(dir: &Path) {
    static HOOKS: Once = Once::new();
    HOOKS.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
        extern "C" fn at_exit() {
            let dirs = std::mem::take(&mut *MADE.lock().unwrap_or_else(|e| e.into_inner()));
            let kept = sweep(&dirs, PANICKED.load(Ordering::SeqCst));
            if !kept.is_empty() {
                eprintln!(
                    "a test failed: its scratch directories are kept: {}",
                    kept.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
        // SAFETY: registers a plain function; it only touches statics and the file system.
        unsafe {
            libc::atexit(at_exit);
        }
    });
    MADE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.to_owned());
}

/// Removes `dirs` unless the process `panicked`; returns those kept (that still exist).
fn sweep(dirs: &[PathBuf], panicked: bool) -> Vec<PathBuf> {
    if panicked {
        return dirs.iter().filter(|d| d.exists()).cloned().collect();
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    Vec::new()
}

/// A fresh directory like [`temp_dir`], removed with everything in it on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        TempDir(temp_dir(label))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_directories_go_unless_something_failed() {
        let dirs = [TempDir::new("sweep-a"), TempDir::new("sweep-b")];
        let paths: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_owned()).collect();
        std::fs::write(paths[0].join("access.log"), "x").unwrap();
        assert_eq!(sweep(&paths, true), paths, "kept after a failure");
        assert!(paths.iter().all(|p| p.exists()));
        assert!(sweep(&paths, false).is_empty());
        assert!(paths.iter().all(|p| !p.exists()), "removed, files and all");
    }
}
