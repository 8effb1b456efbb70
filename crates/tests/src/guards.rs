//! Guards for kernel-side resources a test sets up (nbdfuse mounts, loop devices, file-system
//! mounts). Each undoes itself on Drop, so a failing test never leaves a mount or a loop device
//! behind on the machine. Drop order matters: declare the fuse guard first, then the loop
//! device, then the mount, so they are released mount → loop → fuse.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a command synchronously for cleanup; failures are reported, not fatal.
fn cleanup(program: &str, args: &[&str]) -> bool {
    match Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "cleanup `{program} {}`: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("cleanup `{program} {}`: {e}", args.join(" "));
            false
        }
    }
}

fn is_mountpoint(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    let want = dir.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(want.as_ref()))
}

/// An `nbdfuse MOUNTDIR URI` process exposing the export as `MOUNTDIR/nbd`.
pub struct NbdFuse {
    dir: PathBuf,
    child: Option<Child>,
}

impl NbdFuse {
    /// Mounts `uri` on `dir` (created if needed) and waits until `dir/nbd` is usable.
    pub fn mount(dir: &Path, uri: &str) -> Self {
        std::fs::create_dir_all(dir).expect("create nbdfuse dir");
        let pidfile = dir.with_extension("pid");
        std::fs::remove_file(&pidfile).ok();
        // nbdfuse stays in the foreground; it writes the pid file once the mount is ready.
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nbdfuse: {e}"));
        let mut g = NbdFuse { dir: dir.to_path_buf(), child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if pidfile.exists() && g.file().exists() {
                return g;
            }
            let file_exists = g.file().exists();
            if let Some(c) = g.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                // Some builds daemonize: the parent exits 0 once the mount is ready.
                if status.success() && file_exists {
                    g.child = None;
                    return g;
                }
                let mut err = String::new();
                if let Some(mut e) = c.stderr.take() {
                    use std::io::Read;
                    e.read_to_string(&mut err).ok();
                }
                panic!("nbdfuse {} {uri} exited with {status}: {err}", dir.display());
            }
            if Instant::now() > deadline {
                panic!("nbdfuse did not mount {uri} on {} within 30s", dir.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The file that is the export.
    pub fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        if is_mountpoint(&self.dir) && !cleanup("fusermount3", &["-u", &self.dir.to_string_lossy()])
        {
            cleanup("umount", &["-l", &self.dir.to_string_lossy()]);
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// A loop device attached to a file.
pub struct LoopDevice {
    dev: Option<String>,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap_or_else(|e| panic!("cannot run losetup: {e}"));
        assert!(
            out.status.success(),
            "losetup --find --show {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDevice { dev: Some(dev) }
    }

    pub fn path(&self) -> &str {
        self.dev.as_deref().unwrap_or("")
    }

    /// Detaches now (Drop does it otherwise).
    pub fn detach(mut self) {
        if let Some(d) = self.dev.take() {
            assert!(cleanup("losetup", &["-d", &d]), "losetup -d {d} failed");
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(d) = self.dev.take() {
            cleanup("losetup", &["-d", &d]);
        }
    }
}

/// A mounted file system.
pub struct Mount {
    dir: Option<PathBuf>,
}

impl Mount {
    pub fn new(dev: &str, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("create mount dir");
        let out = Command::new("mount").arg(dev).arg(dir).output().expect("run mount");
        assert!(
            out.status.success(),
            "mount {dev} {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir: Some(dir.to_path_buf()) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_deref().unwrap_or(Path::new("/nonexistent"))
    }

    /// Unmounts now, asserting it worked (Drop does it lazily otherwise).
    pub fn unmount(mut self) {
        if let Some(d) = self.dir.take() {
            assert!(cleanup("umount", &[&d.to_string_lossy()]), "umount {} failed", d.display());
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take()
            && !cleanup("umount", &[&d.to_string_lossy()])
        {
            cleanup("umount", &["-l", &d.to_string_lossy()]);
        }
    }
}
