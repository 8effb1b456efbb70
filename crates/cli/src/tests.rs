use clap::Parser;

use super::*;
use crate::node::NodeCommand;
use crate::pool::PoolCommand;
use crate::volume::VolumeCommand;
use trireme_types::ByteSize;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn parse(args: &str) -> Result<Command, clap::Error> {
    Cli::try_parse_from(std::iter::once("trireme").chain(args.split_whitespace()))
        .map(|c| c.command)
}

#[test]
fn global_flags_go_before_or_after_the_verb() {
    for line in ["volume list -o json --api h:1", "volume -o json --api h:1 list"] {
        let Command::Volume(v) = parse(line).unwrap() else { panic!("{line}") };
        assert_eq!(v.global.output, Output::Json, "{line}");
        assert_eq!(v.global.api.as_deref(), Some("h:1"), "{line}");
        assert!(matches!(v.command, VolumeCommand::List));
    }
    let Command::Node(n) = parse("node get node-1 -o yaml --token t").unwrap() else { panic!() };
    assert_eq!(n.global.output, Output::Yaml);
    assert_eq!(n.global.token.as_deref(), Some("t"));
    assert!(matches!(n.command, NodeCommand::Get { node } if node.as_str() == "node-1"));
}

/// Like the binary: leading flags at the top level, applied to the noun after parsing.
fn parse_leading(args: &[&str]) -> Command {
    use clap::{CommandFactory, FromArgMatches};
    #[derive(Debug, Parser)]
    struct Top {
        #[command(flatten)]
        leading: LeadingOpts,
        #[command(subcommand)]
        command: Command,
    }
    let matches = Top::command()
        .try_get_matches_from(std::iter::once("trireme").chain(args.iter().copied()))
        .unwrap();
    let mut top = Top::from_arg_matches(&matches).unwrap();
    let (_, noun) = matches.subcommand().unwrap();
    top.command.apply_leading(&top.leading, noun);
    top.command
}

#[test]
fn global_flags_also_go_before_the_noun() {
    let Command::Node(n) =
        parse_leading(&["--api", "h:1", "--token", "t", "-o", "json", "node", "list"])
    else {
        panic!()
    };
    assert_eq!(n.global.api.as_deref(), Some("h:1"));
    assert_eq!(n.global.token.as_deref(), Some("t"));
    assert_eq!(n.global.output, Output::Json);
    // Typed after the noun wins.
    let Command::Node(n) = parse_leading(&["-o", "json", "node", "list", "-o", "yaml"]) else {
        panic!()
    };
    assert_eq!(n.global.output, Output::Yaml);
    let Command::Volume(v) = parse_leading(&["--api", "a:1", "volume", "--api", "b:2", "list"])
    else {
        panic!()
    };
    assert_eq!(v.global.api.as_deref(), Some("b:2"));
    // Nothing leading: nothing changes.
    let Command::Pool(p) = parse_leading(&["pool", "list"]) else { panic!() };
    assert_eq!(p.global.output, Output::Table);
    // Commands without client flags ignore them.
    assert!(matches!(parse_leading(&["-o", "json", "snapshot", "list"]), Command::Snapshot(_)));
}

#[test]
fn volume_create_takes_sizes_and_defaults_to_one_replica() {
    let Command::Volume(v) = parse("volume create v1 --size 10GiB --thin").unwrap() else {
        panic!()
    };
    match v.command {
        VolumeCommand::Create { volume, size, replicas, thin, from_snapshot } => {
            assert_eq!(volume.as_str(), "v1");
            assert_eq!(size, ByteSize::gib(10));
            assert_eq!(replicas, 1);
            assert!(thin);
            assert_eq!(from_snapshot, None);
        }
        other => panic!("{other:?}"),
    }
    assert!(parse("volume create v1").is_err(), "--size is required");
    assert!(parse("volume create v1 --size 10GB").is_err());
    assert!(parse("volume create V1 --size 1GiB").is_err(), "names are lowercase");
}

#[test]
fn pool_create_and_publish_flags() {
    let Command::Pool(p) =
        parse("pool create p1 --node node-1 --disk /tmp/p.img --size 4GiB").unwrap()
    else {
        panic!()
    };
    match p.command {
        PoolCommand::Create { pool, node, disk, size } => {
            assert_eq!((pool.as_str(), node.as_str()), ("p1", "node-1"));
            assert_eq!(disk, "/tmp/p.img");
            assert_eq!(size, Some(ByteSize::gib(4)));
        }
        other => panic!("{other:?}"),
    }
    let Command::Volume(v) = parse("volume publish v1 --node node-2").unwrap() else { panic!() };
    assert!(
        matches!(v.command, VolumeCommand::Publish { node: Some(n), .. } if n.as_str() == "node-2")
    );
    let Command::Volume(v) = parse("volume resize v1 --size 2GiB").unwrap() else { panic!() };
    assert!(matches!(v.command, VolumeCommand::Resize { size, .. } if size == ByteSize::gib(2)));
}

#[test]
fn node_operations_and_set_replicas_parse() {
    for (line, verb) in [
        ("node cordon node-1", "cordon"),
        ("node uncordon node-1", "uncordon"),
        ("node drain node-1 -o json", "drain"),
    ] {
        let Command::Node(n) = parse(line).unwrap() else { panic!("{line}") };
        let (got, node) = match n.command {
            NodeCommand::Cordon { node } => ("cordon", node),
            NodeCommand::Uncordon { node } => ("uncordon", node),
            NodeCommand::Drain { node } => ("drain", node),
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!((got, node.as_str()), (verb, "node-1"), "{line}");
    }
    assert!(parse("node drain").is_err(), "the node is required");
    assert!(parse("node cordon Node_1").is_err(), "node names are checked");
    let Command::Volume(v) = parse("volume set-replicas v1 3 -o yaml").unwrap() else { panic!() };
    assert_eq!(v.global.output, Output::Yaml);
    assert!(matches!(
        v.command,
        VolumeCommand::SetReplicas { volume, replicas: 3 } if volume.as_str() == "v1"
    ));
    assert!(parse("volume set-replicas v1").is_err(), "the count is required");
    assert!(parse("volume set-replicas v1 300").is_err(), "at most 255");
    assert!(parse("volume set-replicas v1 -1").is_err());
}

#[tokio::test]
async fn new_verbs_reach_the_api() {
    // Nothing listens there: each verb makes its request and reports the address it tried,
    // rather than answering "not available".
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for line in [
        "node cordon node-1",
        "node uncordon node-1",
        "node drain node-1",
        "volume set-replicas v1 2",
    ] {
        let line = format!("{line} --api 127.0.0.1:{port} --token t");
        let cmd = parse(&line).unwrap();
        let err = run(cmd, CancellationToken::new()).await.unwrap_err();
        assert_eq!(err.exit_code(), 1, "{line}: {err}");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{line}: {err}");
    }
}

#[test]
fn output_formats_are_checked() {
    assert!(parse("node list -o xml").is_err());
    assert!(parse("node list -o table").is_ok());
}

#[tokio::test]
async fn later_commands_answer_not_available() {
    for line in [
        "snapshot list",
        "snapshot create v1 s1",
        "volume create v2 --size 1GiB --from-snapshot s1",
    ] {
        let cmd = parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        // Offline: these must fail before any request (the API address is unreachable).
        let err = run(cmd, CancellationToken::new()).await.unwrap_err();
        assert_eq!(err.exit_code(), 2, "{line}: {err}");
        assert!(err.to_string().contains("not available yet"), "{line}: {err}");
    }
}

#[test]
fn endpoint_defaults_to_the_local_up() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    // Nothing there yet: the default address, no token.
    let e = Endpoint::resolve(&GlobalOpts::default(), Some(dir.path())).unwrap();
    assert_eq!(e, Endpoint { api: "http://127.0.0.1:7480".into(), token: None });

    std::fs::create_dir_all(layout.control_dir()).unwrap();
    std::fs::write(layout.admin_token(), "secret\n").unwrap();
    let e = Endpoint::resolve(&GlobalOpts::default(), Some(dir.path())).unwrap();
    assert_eq!(e.token.as_deref(), Some("secret"));

    // A running `up` on another port: its up.json says where.
    let ports = trireme_up::Ports::derive("127.0.0.1:9100".parse().unwrap(), 1).unwrap();
    let mut state: UpState = serde_json::from_value(serde_json::json!({
        "version": 1, "pid": 1, "data_dir": "/d", "api_url": "http://127.0.0.1:9100",
        "admin_token": "/d/t", "viewer_token": "/d/v", "logs_dir": "/d/logs", "ready": true,
        "control": {"pid": null, "api": ports.api, "grpc": ports.control_grpc,
                    "data_dir": "/d/control", "log": "/d/l", "restarts": 0},
        "nodes": []
    }))
    .unwrap();
    state.write(&layout.state_file()).unwrap();
    let e = Endpoint::resolve(&GlobalOpts::default(), Some(dir.path())).unwrap();
    assert_eq!(e.api, "http://127.0.0.1:9100");
    assert_eq!(e.token.as_deref(), Some("secret"));
    state.api_url = "http://10.0.0.1:9100".into();
    state.write(&layout.state_file()).unwrap();
    let e = Endpoint::resolve(&GlobalOpts::default(), Some(dir.path())).unwrap();
    assert_eq!(e.token.as_deref(), Some("secret"), "up.json's own address is trusted");
}

#[test]
fn explicit_flags_win_and_remote_apis_get_no_local_token() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    std::fs::create_dir_all(layout.control_dir()).unwrap();
    std::fs::write(layout.admin_token(), "secret").unwrap();
    let opts = GlobalOpts { api: Some("10.1.2.3:7480".into()), ..Default::default() };
    let e = Endpoint::resolve(&opts, Some(dir.path())).unwrap();
    assert_eq!(e, Endpoint { api: "10.1.2.3:7480".into(), token: None });
    let opts = GlobalOpts {
        api: Some("10.1.2.3:7480".into()),
        token: Some("mine".into()),
        ..Default::default()
    };
    assert_eq!(Endpoint::resolve(&opts, Some(dir.path())).unwrap().token.as_deref(), Some("mine"));
    let opts = GlobalOpts { api: Some("localhost:7480".into()), ..Default::default() };
    assert_eq!(
        Endpoint::resolve(&opts, Some(dir.path())).unwrap().token.as_deref(),
        Some("secret")
    );
}

#[test]
fn local_addresses() {
    for a in
        ["127.0.0.1:7480", "http://127.0.0.1:7480/", "localhost:1", "http://[::1]:7480", "[::1]:1"]
    {
        assert!(is_local(a), "{a}");
    }
    for a in [
        "10.0.0.1:7480",
        "https://example.com",
        "http://[2001:db8::1]:80",
        "example.com:80",
        // Credentials make the host the part after '@': never local, whatever comes before.
        "http://127.0.0.1:7480@example.com",
        "http://[::1]@example.com",
        "localhost:1@example.com",
    ] {
        assert!(!is_local(a), "{a}");
    }
}
