//! A pool disk that can be made to fail on demand.
//!
//! ```text
//!   engine ──O_DIRECT──> /dev/loopN (--direct-io=on)
//!                          └─> D/fuse/nbd          (nbdfuse: a FUSE file backed by NBD)
//!                                └─> unix socket ─> nbdkit --filter=error file D/disk.img
//!                                                    error=EIO error-rate=100% error-file=D/fail
//! ```
//!
//! Creating `D/fail` makes every request fail with EIO; removing it heals the disk. A loop
//! device is needed because the engine opens its disk with `O_DIRECT`; on this kernel (6.18) a
//! loop device with `--direct-io=on` over the FUSE file works, and `losetup` falls back to
//! buffered mode by itself where the backing file refuses direct I/O, so the chain is usable
//! either way (the engine sees a block device in both cases).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::net::{sh, sh_quiet};
use crate::guards::NbdFuse;

/// nbdkit + nbdfuse + loop device over a sparse image. Dropping it tears the chain down in
/// reverse order.
pub struct FaultyDisk {
    dir: PathBuf,
    // Field order is drop order: loop device first, then the FUSE mount, then nbdkit.
    loop_dev: Option<String>,
    fuse: Option<NbdFuse>,
    nbdkit: Option<Child>,
}

impl std::fmt::Debug for FaultyDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyDisk").field("dir", &self.dir).field("loop", &self.loop_dev).finish()
    }
}

impl FaultyDisk {
    /// Builds the chain in `dir` over a sparse image of `size` bytes.
    pub fn create(dir: &Path, size: u64) -> FaultyDisk {
        std::fs::create_dir_all(dir).expect("create disk dir");
        let img = dir.join("disk.img");
        std::fs::File::create(&img).and_then(|f| f.set_len(size)).expect("create disk image");
        let sock = dir.join("nbdkit.sock");
        let pidfile = dir.join("nbdkit.pid");
        let mut disk = FaultyDisk { dir: dir.to_owned(), loop_dev: None, fuse: None, nbdkit: None };
        let child = {
            use std::os::unix::process::CommandExt;
            let mut cmd = Command::new("nbdkit");
            cmd.arg("--foreground")
                .arg("--exit-with-parent")
                .arg("-U")
                .arg(&sock)
                .arg("-P")
                .arg(&pidfile)
                .arg("--filter=error")
                .arg("file")
                .arg(&img)
                .arg("error=EIO")
                .arg("error-rate=100%")
                .arg(format!("error-file={}", disk.fail_file().display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // Its own process group: a test runner's Ctrl-C reaches the test, which cleans up.
            cmd.process_group(0);
            cmd.spawn().unwrap_or_else(|e| panic!("cannot start nbdkit: {e}"))
        };
        disk.nbdkit = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(pidfile.exists() && sock.exists()) {
            if let Some(c) = disk.nbdkit.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("nbdkit (error filter over {}) exited with {status}", img.display());
            }
            assert!(Instant::now() < deadline, "nbdkit did not start within 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        disk.fuse = Some(NbdFuse::mount(&dir.join("fuse"), &uri));
        let file = dir.join("fuse").join("nbd");
        let file_s = file.to_string_lossy().into_owned();
        let dev = sh("losetup", &["--find", "--show", "--direct-io=on", &file_s])
            .or_else(|e| {
                eprintln!("losetup --direct-io=on failed ({e}); using a buffered loop device");
                sh("losetup", &["--find", "--show", &file_s])
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let dev = dev.trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        disk.loop_dev = Some(dev);
        disk
    }

    /// The block device the pool lives on.
    pub fn device(&self) -> &str {
        self.loop_dev.as_deref().unwrap_or("")
    }

    fn fail_file(&self) -> PathBuf {
        self.dir.join("fail")
    }

    /// Every request fails with EIO from now on.
    pub fn fail(&self) {
        std::fs::File::create(self.fail_file()).expect("create the error file");
    }

    /// Requests succeed again.
    pub fn heal(&self) {
        match std::fs::remove_file(self.fail_file()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove the error file: {e}"),
        }
    }
}

/// The pid in a path component `trireme-hosts-<pid><letter>-…` (a test's directory).
fn owner_pid(path: &str) -> Option<u32> {
    let rest = &path[path.find("trireme-hosts-")? + "trireme-hosts-".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn dead(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Detaches loop devices, unmounts FUSE mounts and kills nbdfuse processes left behind by test
/// processes that died without running Drop (a runner's timeout kills with SIGKILL).
pub fn sweep_stale() {
    if let Ok(list) = sh("losetup", &["-l", "-n", "-O", "NAME,BACK-FILE"]) {
        for line in list.lines() {
            let mut parts = line.split_whitespace();
            let (Some(dev), Some(file)) = (parts.next(), parts.next()) else { continue };
            if owner_pid(file).is_some_and(dead) {
                sh_quiet("losetup", &["-d", dev]);
            }
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for line in mounts.lines() {
            let mut parts = line.split_whitespace();
            let (Some(_), Some(dir), Some(fstype)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if fstype.starts_with("fuse") && owner_pid(dir).is_some_and(dead) {
                sh_quiet("fusermount3", &["-u", "-z", dir]);
            }
        }
    }
    for p in crate::procs::all() {
        if p.args.first().is_some_and(|a| a.ends_with("nbdfuse"))
            && p.args.iter().any(|a| owner_pid(a).is_some_and(dead))
        {
            crate::procs::signal(p.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    // Then the directories themselves (nothing is mounted in them any more).
    let roots =
        [std::env::var_os("TRIREME_TEST_TMPDIR").map(PathBuf::from), Some(std::env::temp_dir())];
    for root in roots.into_iter().flatten() {
        let Ok(rd) = std::fs::read_dir(&root) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("trireme-hosts-") && owner_pid(&name).is_some_and(dead) {
                std::fs::remove_dir_all(&path).ok();
            }
        }
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        std::fs::remove_file(self.fail_file()).ok();
        if let Some(dev) = self.loop_dev.take() {
            sh_quiet("losetup", &["-d", &dev]);
        }
        drop(self.fuse.take());
        if let Some(mut c) = self.nbdkit.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_read_from_test_directories() {
        assert_eq!(owner_pid("/tmp/trireme-hosts-1234a-XyZ/disk-0/fuse/nbd"), Some(1234));
        assert_eq!(owner_pid("/tmp/other/disk"), None);
        assert!(!dead(std::process::id()));
    }
}
