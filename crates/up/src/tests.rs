use std::num::NonZeroUsize;
use std::time::Duration;

use clap::Parser;

use super::*;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    up: UpArgs,
}

fn parse(args: &[&str]) -> Result<UpArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("up").chain(args.iter().copied())).map(|c| c.up)
}

#[test]
fn defaults() {
    let a = parse(&[]).unwrap();
    assert_eq!(a.nodes, None);
    assert_eq!(a.node_count(), 3);
    assert_eq!(a.pool_size, None);
    assert_eq!(a.pool_size(), ByteSize::gib(4));
    assert_eq!(a.api, "127.0.0.1:7480".parse().unwrap());
    assert_eq!(a.data_dir, None);
}

#[test]
fn flags() {
    let a = parse(&[
        "--data-dir",
        "/tmp/x",
        "--nodes",
        "1",
        "--pool-size",
        "512MiB",
        "--api",
        "127.0.0.1:9000",
    ])
    .unwrap();
    assert_eq!(a.data_dir.as_deref(), Some(Path::new("/tmp/x")));
    assert_eq!(a.nodes, Some(1));
    assert_eq!(a.pool_size, Some(ByteSize::mib(512)));
    assert_eq!(a.api.port(), 9000);
}

#[test]
fn bad_flags_are_refused() {
    assert!(parse(&["--nodes", "0"]).is_err());
    assert!(parse(&["--pool-size", "4GB"]).is_err());
    assert!(parse(&["--api", "127.0.0.1:0"]).is_err());
    assert!(parse(&["--api", "nowhere"]).is_err());
}

#[test]
fn children_get_derived_addresses_and_dirs() {
    let layout = Layout::new("/d");
    let ports = Ports::derive("127.0.0.1:20000".parse().unwrap(), 2).unwrap();
    let control = control_spec(Path::new("/bin/trireme"), &layout, &ports, &[]);
    let args: Vec<String> = control.args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    assert_eq!(
        args,
        [
            "control",
            "--api-listen",
            "127.0.0.1:20000",
            "--grpc-listen",
            "127.0.0.1:20001",
            "--data-dir",
            "/d/control"
        ]
    );
    let engine = engine_spec(
        Path::new("/bin/trireme"),
        &layout,
        &ports,
        &ports.engines[1],
        NonZeroUsize::new(2).unwrap(),
        &[],
    );
    let args: Vec<String> = engine.args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    assert_eq!(
        args,
        [
            "engine",
            "--node-id",
            "node-2",
            "--grpc-listen",
            "127.0.0.1:20014",
            "--nbd-listen",
            "127.0.0.1:20015",
            "--nbd-advertise",
            "127.0.0.1:20015",
            "--control",
            "http://127.0.0.1:20001",
            "--state-dir",
            "/d/node-2",
            "--worker-threads",
            "2",
            "--metrics-listen",
            "127.0.0.1:20017"
        ]
    );
    assert_eq!(engine.log, Path::new("/d/logs/node-2.log"));
}

#[test]
fn engines_share_the_cpus() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(engine_threads(1).get(), (cpus - 1).max(1));
    assert_eq!(engine_threads(u16::try_from(cpus * 2).unwrap()).get(), 1);
    let a = parse(&["--engine-threads", "3"]).unwrap();
    assert_eq!(a.engine_threads, NonZeroUsize::new(3));
    assert!(parse(&["--engine-threads", "0"]).is_err());
}

#[test]
fn wildcard_api_advertises_loopback() {
    let layout = Layout::new("/d");
    let ports = Ports::derive("0.0.0.0:20000".parse().unwrap(), 1).unwrap();
    let engine =
        engine_spec(Path::new("/t"), &layout, &ports, &ports.engines[0], NonZeroUsize::MIN, &[]);
    let args: Vec<String> = engine.args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    assert!(args.windows(2).any(|w| w == ["--nbd-listen", "0.0.0.0:20013"]));
    assert!(args.windows(2).any(|w| w == ["--nbd-advertise", "127.0.0.1:20013"]));
    assert!(args.windows(2).any(|w| w == ["--control", "http://127.0.0.1:20001"]));
}

#[test]
fn initial_state_lists_every_node() {
    let layout = Layout::new("/d");
    let ports = Ports::derive("127.0.0.1:20000".parse().unwrap(), 3).unwrap();
    let s = initial_state(&layout, &ports);
    assert_eq!(s.api_url, "http://127.0.0.1:20000");
    assert_eq!(s.nodes.len(), 3);
    assert_eq!(s.nodes[2].pool, "pool-3");
    assert_eq!(s.nodes[2].pool_disk, Path::new("/d/node-3/pool.img"));
    assert!(!s.ready);
}

#[test]
fn data_dir_is_created_private_and_absolute() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b");
    let abs = prepare_dir(&dir, 2).unwrap();
    assert!(abs.is_absolute());
    for sub in ["control", "logs", "node-1", "node-2"] {
        assert!(abs.join(sub).is_dir(), "{sub}");
    }
    let mode = std::fs::metadata(&abs).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "data dir is readable by others: {mode:o}");
}

#[test]
fn a_busy_port_is_named() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    // Put the busy port where node-1's gRPC goes: API port = busy - 12.
    let Some(api) = port.checked_sub(12) else { return };
    let Ok(ports) = Ports::derive(SocketAddr::new([127, 0, 0, 1].into(), api), 1) else { return };
    match check_ports_free(&ports) {
        Err(UpError::PortInUse { what, addr }) => {
            // Another listener below ours may be busy too; the error names whichever it met.
            assert!(addr.port() <= port, "{what} {addr}");
        }
        other => panic!("expected PortInUse, got {other:?}"),
    }
}

#[test]
fn banner_tells_where_things_are() {
    let args = parse(&["--data-dir", "/nonexistent/x", "--nodes", "1"]).unwrap();
    let b = banner(&args, &Layout::new("/nonexistent/x"), "http://127.0.0.1:7480");
    assert!(b.contains("http://127.0.0.1:7480"), "{b}");
    assert!(b.contains("/nonexistent/x/control/admin.token"), "{b}");
    assert!(b.contains("/nonexistent/x/logs/"), "{b}");
    assert!(b.contains("1 node,"), "{b}");
    assert!(b.contains("trireme volume create v1 --size 1GiB && trireme volume publish v1"));
    assert_eq!(hint_size(ByteSize::gib(4)), ByteSize::gib(1));
    assert_eq!(hint_size(ByteSize::mib(256)), ByteSize::mib(64));
    assert_eq!(hint_size(ByteSize::mib(2)), ByteSize::mib(1));
    // Not the default directory: the hint says how to point the CLI at it.
    assert!(b.contains("export TRIREME_DATA_DIR=/nonexistent/x\n"), "{b}");
}

/// A child that is killed comes back with a new pid; shutdown stops it.
#[tokio::test]
async fn supervisor_restarts_a_killed_child_and_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    let ports = Ports::derive("127.0.0.1:20000".parse().unwrap(), 1).unwrap();
    let (tx, mut rx) = watch::channel(initial_state(&layout, &ports));
    let spec = ChildSpec {
        name: "node-1".into(),
        binary: "/bin/sh".into(),
        args: vec!["-c".into(), "echo hello $GREETING; exec sleep 300".into()],
        env: vec![("GREETING".into(), "from-up".into())],
        log: layout.log_file("node-1"),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(supervise::supervise(spec, tx, stop.clone()));

    let wait_pid = |rx: &mut watch::Receiver<UpState>, not: Option<u32>| {
        let mut rx = rx.clone();
        async move {
            let s =
                rx.wait_for(|s| s.nodes[0].pid.is_some() && s.nodes[0].pid != not).await.unwrap();
            (s.nodes[0].pid.unwrap(), s.nodes[0].restarts)
        }
    };
    let limit = Duration::from_secs(60);
    let (first, restarts) = tokio::time::timeout(limit, wait_pid(&mut rx, None)).await.unwrap();
    assert_eq!(restarts, 0);
    // The child's output lands in its log.
    let log_path = layout.log_file("node-1");
    let logged = async {
        while !std::fs::read_to_string(&log_path).unwrap_or_default().contains("hello from-up") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(limit, logged).await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (second, restarts) =
        tokio::time::timeout(limit, wait_pid(&mut rx, Some(first))).await.unwrap();
    assert_ne!(first, second);
    assert_eq!(restarts, 1);

    stop.cancel();
    tokio::time::timeout(limit, task).await.unwrap().unwrap();
    assert_eq!(rx.borrow().nodes[0].pid, None);
    // The child is gone (reaped, so not even a zombie).
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(second as i32), None).is_err());
    let log = std::fs::read_to_string(layout.log_file("node-1")).unwrap();
    assert_eq!(log.matches("==== trireme up: starting node-1").count(), 2, "{log}");
}

/// The whole of `run` with a "server" that cannot start: `up` notices the crash loop, says why
/// in one sentence quoting the child's last words, stops, and leaves no up.json behind.
#[tokio::test]
async fn a_crash_looping_control_fails_startup_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("fake-trireme");
    std::fs::write(&script, "#!/bin/sh\necho \"error: cannot start $1\" >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let api = free_api_port();
    let args = UpArgs {
        data_dir: Some(tmp.path().join("data")),
        nodes: Some(1),
        pool_size: Some(ByteSize::mib(64)),
        api,
        engine_threads: None,
        binary: Some(script),
        child_env: vec![],
    };
    let err =
        tokio::time::timeout(Duration::from_secs(120), run_cluster(args, CancellationToken::new()))
            .await
            .unwrap()
            .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("control keeps exiting (restarted 3 times); see "), "{msg}");
    assert!(msg.ends_with("(it last said: error: cannot start control)"), "{msg}");
    assert!(!tmp.path().join("data/up.json").exists());
    // The lock was released: the same directory can be used again.
    lock::DirLock::acquire(&tmp.path().join("data/up.lock"), tmp.path()).unwrap();
}

/// An API port whose whole derived range is free right now.
fn free_api_port() -> SocketAddr {
    for _ in 0..100 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let api = SocketAddr::from(([127, 0, 0, 1], port));
        if let Ok(ports) = Ports::derive(api, 1)
            && check_ports_free(&ports).is_ok()
        {
            return api;
        }
    }
    panic!("no free port range");
}

/// A second `up` without `--nodes` resumes as many nodes as the cluster had, so that volumes
/// placed on node-4 and node-5 of a five-node cluster do not silently go offline.
#[test]
fn the_node_count_of_an_earlier_run_is_found_in_the_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    assert_eq!(layout.existing_nodes(), 0);
    prepare_dir(tmp.path(), 5).unwrap();
    assert_eq!(layout.existing_nodes(), 5);
    // A gap ends the count: node-7 alone is not a seventh node of this cluster.
    std::fs::create_dir(layout.node_dir(7)).unwrap();
    assert_eq!(layout.existing_nodes(), 5);

    assert_eq!(layout.existing_pool_size(), None);
    std::fs::write(layout.pool_image(1), vec![0; 8192]).unwrap();
    assert_eq!(layout.existing_pool_size(), Some(ByteSize::b(8192)));

    assert_eq!(nodes_to_run(None, 5), 5);
    assert_eq!(nodes_to_run(None, 0), 3);
    assert_eq!(nodes_to_run(Some(2), 5), 2);
    assert_eq!(nodes_to_run(Some(4), 0), 4);
}

/// A child that never restarts still has its log kept bounded: copied aside and truncated
/// under the descriptor the child keeps writing through.
#[test]
fn the_log_of_a_running_child_is_rotated_in_place() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("node-1.log");
    let mut child = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    child.write_all(&[b'a'; 100]).unwrap();
    assert!(!supervise::rotate_open(&log, 100).unwrap(), "rotated at the limit");
    child.write_all(b"b").unwrap();
    assert!(supervise::rotate_open(&log, 100).unwrap());
    child.write_all(b"after\n").unwrap();
    assert_eq!(std::fs::read(&log).unwrap(), b"after\n");
    assert_eq!(std::fs::read(tmp.path().join("node-1.log.1")).unwrap().len(), 101);
}

/// An engine that keeps exiting after it registered ends the pool steps at once, naming it
/// and its log, instead of after each step's full timeout.
#[test]
fn an_engine_in_a_crash_loop_is_named() {
    let layout = Layout::new("/d");
    let ports = Ports::derive("127.0.0.1:20000".parse().unwrap(), 2).unwrap();
    let (tx, rx) = watch::channel(initial_state(&layout, &ports));
    assert!(bootstrap::crash_loop(&rx, &layout).is_ok());
    tx.send_modify(|s| s.nodes[1].restarts = 3);
    let err = bootstrap::crash_loop(&rx, &layout).unwrap_err().to_string();
    assert!(
        err.starts_with("node-2 keeps exiting (restarted 3 times); see /d/logs/node-2.log"),
        "{err}"
    );
}

/// A per-instance setting in `up`'s environment (one metrics port, one advertised address)
/// would reach every child alike: it is removed, while the spec's own variables are set.
#[test]
fn children_do_not_inherit_per_instance_settings() {
    let spec = ChildSpec {
        name: "node-1".into(),
        binary: "/bin/true".into(),
        args: vec![],
        env: vec![("TRIREME_LOG_FORMAT".into(), "json".into())],
        log: "/d/logs/node-1.log".into(),
    };
    let cmd = supervise::command(&spec);
    let envs: Vec<_> = cmd.as_std().get_envs().collect();
    for var in ["TRIREME_METRICS_LISTEN", "TRIREME_GRPC_ADVERTISE", "TRIREME_DATA_DIR"] {
        assert!(envs.contains(&(std::ffi::OsStr::new(var), None)), "{var} is inherited");
    }
    let format = (std::ffi::OsStr::new("TRIREME_LOG_FORMAT"), Some(std::ffi::OsStr::new("json")));
    assert!(envs.contains(&format));
}
