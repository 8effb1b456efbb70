//! Interop: standard NBD clients against a published 1-replica volume — nbdinfo, nbdcopy,
//! qemu-img compare, fio's nbd engine with verification, and nbdfuse + loop + ext4.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use trireme_tests::guards::{LoopDevice, Mount, NbdFuse};
use trireme_tests::tools::{assert_files_equal, random_file, run_ok, sha256_file, stdout};
use trireme_tests::{ByteSize, Cluster};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_nbdcopy_qemu_img_and_fio() {
    let c = Cluster::start(1, ByteSize::mib(512)).await;
    let tmp = tempfile::tempdir().unwrap();

    // ---- nbdinfo: size, export name and the capabilities the engine promises.
    let (vol, uri) = c.create_published("interop-a", ByteSize::mib(64)).await;
    let out = run_ok("nbdinfo", &["--json", "--no-content", &uri], T).await;
    let info: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("nbdinfo --json printed invalid JSON ({e}): {}", stdout(&out)));
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64(), Some(64 * MIB), "nbdinfo: {info}");
    assert_eq!(
        export["export-name"].as_str(),
        Some(vol.id.to_string().as_str()),
        "nbdinfo: {info}"
    );
    for flag in ["can_flush", "can_fua", "can_trim", "can_multi_conn", "can_zero"] {
        assert_eq!(export[flag].as_bool(), Some(true), "nbdinfo {flag}: {info}");
    }
    assert_eq!(export["is_read_only"].as_bool(), Some(false), "nbdinfo: {info}");

    // ---- nbdcopy round trip of random data.
    let src = tmp.path().join("src.bin");
    let back = tmp.path().join("back.bin");
    random_file(&src, (64 * MIB) as usize);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri], T).await;
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()], T).await;
    assert_files_equal(&src, &back, "nbdcopy round trip changed the data");

    // ---- qemu-img compare: the source file against the NBD URI.
    let out =
        run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &uri], T)
            .await;
    assert!(stdout(&out).contains("identical"), "qemu-img compare: {}", stdout(&out));

    // ---- fio's nbd engine: random writes at QD16, then every block verified by crc32c.
    let (_, uri_b) = c.create_published("interop-fio", ByteSize::mib(64)).await;
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri_b}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify-state file in the working directory (the crate dir under cargo).
            "--verify_state_save=0",
            "--output-format=json",
        ],
        T,
    )
    .await;
    let text = stdout(&out);
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("fio printed invalid JSON ({e}): {text}"));
    let job = &json["jobs"][0];
    assert_eq!(job["error"].as_i64(), Some(0), "fio job error: {job}");
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(32 * MIB),
        "fio wrote less than asked: {job}"
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(32 * MIB),
        "fio verified less than it wrote: {job}"
    );

    // The first volume is untouched by the second's load.
    let again = tmp.path().join("again.bin");
    run_ok("nbdcopy", &[&uri, again.to_str().unwrap()], T).await;
    assert_files_equal(&src, &again, "volume A changed under volume B's load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdfuse_loop_ext4_survives_remount() {
    let c = Cluster::start(1, ByteSize::mib(512)).await;
    let tmp = tempfile::tempdir().unwrap();
    let (_, uri) = c.create_published("interop-fs", ByteSize::mib(128)).await;
    let fuse_dir = tmp.path().join("fuse");
    let mnt = tmp.path().join("mnt");

    // Files of assorted sizes with their checksums.
    let files: Vec<(String, usize)> = vec![
        ("a.bin".into(), 1 << 20),
        ("b.bin".into(), 7 * (1 << 20) + 123),
        ("c.txt".into(), 4096),
    ];
    let mut sums = Vec::new();
    {
        let fuse = NbdFuse::mount(&fuse_dir, &uri);
        let lo = LoopDevice::attach(&fuse.file());
        run_ok("mkfs.ext4", &["-q", "-F", lo.path()], T).await;
        let m = Mount::new(lo.path(), &mnt);
        std::fs::create_dir_all(m.path().join("dir")).unwrap();
        for (name, len) in &files {
            let p = m.path().join("dir").join(name);
            random_file(&p, *len);
            sums.push(sha256_file(&p, None));
        }
        run_ok("sync", &[] as &[&str], T).await;
        m.unmount();
        lo.detach();
        drop(fuse);
    }
    // Everything detached: nothing of the first mount can serve the reads below from a cache.
    {
        let fuse = NbdFuse::mount(&fuse_dir, &uri);
        let lo = LoopDevice::attach(&fuse.file());
        run_ok("fsck.ext4", &["-n", "-f", lo.path()], T).await;
        let m = Mount::new(lo.path(), &mnt);
        for ((name, len), sum) in files.iter().zip(&sums) {
            let p = m.path().join("dir").join(name);
            let meta = std::fs::metadata(&p)
                .unwrap_or_else(|e| panic!("{} after remount: {e}", p.display()));
            assert_eq!(meta.len(), *len as u64, "{name} has the wrong size after remount");
            assert_eq!(&sha256_file(&p, None), sum, "{name} changed across unmount/remount");
        }
        m.unmount();
        lo.detach();
        drop(fuse);
    }
}
