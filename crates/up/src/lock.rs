//! One `up` per data directory: two would start two controls on the same store and two engines
//! on the same pool file. The guard is an `flock` on `DIR/up.lock`, so it disappears with the
//! process however it dies; the file holds the owner's pid only to name it in the error.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::UpError;

/// Held while `up` runs; dropping it releases the lock.
#[derive(Debug)]
pub struct DirLock {
    _file: Flock<File>,
}

impl DirLock {
    /// Takes the lock of the data directory whose lock file is `path`, or says who holds it.
    pub fn acquire(path: &Path, dir: &Path) -> Result<Self, UpError> {
        let lock_err = |source| UpError::Lock { path: path.to_owned(), source };
        // Not truncated on open: the current holder's pid must survive a failed attempt.
        // Rust opens files close-on-exec, so the children `up` starts do not inherit the lock.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(lock_err)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                // Best effort: the pid only makes the message more useful.
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let pid = if pid.is_empty() { "unknown".to_owned() } else { pid.to_owned() };
                return Err(UpError::AlreadyRunning { dir: dir.to_owned(), pid });
            }
            Err((_, errno)) => return Err(lock_err(errno.into())),
        };
        file.set_len(0).map_err(lock_err)?;
        file.seek(SeekFrom::Start(0)).map_err(lock_err)?;
        writeln!(file, "{}", std::process::id()).map_err(lock_err)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.lock");
        let first = DirLock::acquire(&path, dir.path()).unwrap();
        let err = DirLock::acquire(&path, dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        assert!(msg.contains("already running"), "{msg}");
        drop(first);
        // Released on drop: the next `up` gets it.
        DirLock::acquire(&path, dir.path()).unwrap();
    }
}
