//! The REST surface itself: bad input, unknown ids, auth, OpenAPI, health and metrics.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FakeNode, TestControl, nodes_online, pool_online};
use reqwest::StatusCode;
use trireme_api::{Client, Problem};

async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, String, String) {
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_owned());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ctype, resp.text().await.unwrap())
}

fn problem(status: StatusCode, ctype: &str, body: &str) -> Problem {
    assert_eq!(ctype, "application/problem+json", "status {status}, body {body}");
    let p: Problem = serde_json::from_str(body).unwrap();
    assert_eq!(p.status, status.as_u16());
    assert!(!p.detail.is_empty());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_problems_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    nodes_online(&api, 1).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    let admin = control.token(trireme_control::ADMIN_TOKEN_FILE);
    let http = reqwest::Client::new();
    let post = |body: &'static str| {
        let (http, url, admin) = (http.clone(), control.url("/v1/volumes"), admin.clone());
        async move { send(&http, reqwest::Method::POST, &url, Some(&admin), Some(body)).await }
    };

    let cases: &[(&str, u16, &str)] = &[
        ("{not json", 400, "not valid JSON"),
        ("[]", 400, "JSON object"),
        (r#"{"name":"Bad Name","size":1048576}"#, 422, "Bad Name"),
        (r#"{"name":"v","size":0}"#, 422, "greater than zero"),
        (r#"{"name":"v","size":1000}"#, 422, "multiple of 512"),
        (r#"{"name":"v","size":-5}"#, 422, "invalid request body"),
        (r#"{"name":"v"}"#, 422, "size"),
        (r#"{"name":"v","size":1048576,"colour":"red"}"#, 422, "colour"),
        (r#"{"name":"v","size":1048576,"replicas":0}"#, 422, "at least 1"),
        (r#"{"name":"v","size":1048576,"replicas":300}"#, 422, "invalid request body"),
    ];
    for (body, status, needle) in cases {
        let (s, ctype, text) = post(body).await;
        assert_eq!(s.as_u16(), *status, "{body} -> {text}");
        let p = problem(s, &ctype, &text);
        assert!(p.detail.contains(needle), "{body}: {:?} lacks {needle:?}", p.detail);
    }
    // Over axum's body limit: 413, still a problem document.
    let huge = format!(r#"{{"name":"v","size":1048576,"pad":"{}"}}"#, "x".repeat(3 << 20));
    let huge: &'static str = huge.leak();
    let (s, ctype, text) = post(huge).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    problem(s, &ctype, &text);
    let pool_url = control.url("/v1/pools");
    let (s, ctype, text) = send(
        &http,
        reqwest::Method::POST,
        &pool_url,
        Some(&admin),
        Some(r#"{"name":"p","node":"ghost","disk":"/x"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(problem(s, &ctype, &text).detail.contains("ghost"));
    // The engine refuses the disk: a clear answer and no pool spec left behind.
    let bad_disk = trireme_api::CreatePoolBody {
        name: "pool-bad".parse().unwrap(),
        node: "node-1".parse().unwrap(),
        disk: "/bad/disk".into(),
        size: None,
    };
    let err = api.create_pool(&bad_disk).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("/bad/disk does not exist"), "{err}");
    assert!(api.pool("pool-bad").await.unwrap_err().is_not_found());
    let resize = control.url("/v1/volumes/nope/resize");
    let (s, ..) =
        send(&http, reqwest::Method::POST, &resize, Some(&admin), Some(r#"{"size":"big"}"#)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // Unknown ids: 404 naming the id, for every kind.
    for (path, id) in [
        ("/v1/volumes/no-such-vol", "no-such-vol"),
        (
            "/v1/volumes/6f1c1e6e-5b8a-4a3e-9d7e-0a1b2c3d4e5f",
            "6f1c1e6e-5b8a-4a3e-9d7e-0a1b2c3d4e5f",
        ),
        ("/v1/volumes/Bad%20Name/replicas", "Bad Name"),
        ("/v1/pools/nope", "nope"),
        ("/v1/nodes/nope", "nope"),
    ] {
        let (s, ctype, text) =
            send(&http, reqwest::Method::GET, &control.url(path), Some(&admin), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert!(problem(s, &ctype, &text).detail.contains(id), "{text}");
    }
    let (s, ctype, text) =
        send(&http, reqwest::Method::GET, &control.url("/v1/nothing"), Some(&admin), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    problem(s, &ctype, &text);
    let (s, ctype, text) =
        send(&http, reqwest::Method::PATCH, &control.url("/v1/volumes"), Some(&admin), None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    problem(s, &ctype, &text);
    assert!(api.delete_volume("ghost").await.unwrap_err().is_not_found());
    assert!(api.unpublish_volume("ghost").await.unwrap_err().is_not_found());

    // Still serving, and nothing was created by the bad requests.
    assert!(api.volumes().await.unwrap().is_empty());
    assert_eq!(api.health().await.unwrap().status, "ok");
    n1.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_roles_openapi_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let http = reqwest::Client::new();

    // No token / unknown token: 401 problem.
    for token in [None, Some("not-a-token")] {
        let (s, ctype, text) =
            send(&http, reqwest::Method::GET, &control.url("/v1/volumes"), token, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        problem(s, &ctype, &text);
    }
    let anon = Client::new(&control.api.to_string(), None).unwrap();
    assert_eq!(anon.volumes().await.unwrap_err().status(), Some(401));

    // A viewer reads but may not write.
    let viewer = control.viewer();
    assert!(viewer.volumes().await.unwrap().is_empty());
    assert!(viewer.nodes().await.unwrap().is_empty());
    let body = trireme_api::CreateVolumeBody {
        name: "v".parse().unwrap(),
        id: None,
        size: trireme_types::ByteSize::mib(1),
        replicas: 1,
        thin: false,
    };
    let err = viewer.create_volume(&body).await.unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert!(err.to_string().contains("admin"), "{err}");
    assert_eq!(viewer.delete_pool("p").await.unwrap_err().status(), Some(403));
    // The admin gets past auth (and then a real answer: no pool → 503 with a sentence).
    let err = control.admin().create_volume(&body).await.unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    assert!(err.to_string().contains("create a pool"), "{err}");

    // Health needs no token.
    assert_eq!(anon.health().await.unwrap().status, "ok");
    assert_eq!(anon.ready().await.unwrap().status, "ok");

    // OpenAPI: parses and lists every route.
    let doc = viewer.get_text("/v1/openapi.json").await.unwrap();
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/nodes",
        "/v1/nodes/{id}",
        "/v1/pools",
        "/v1/pools/{id}",
        "/v1/volumes",
        "/v1/volumes/{id}",
        "/v1/volumes/{id}/resize",
        "/v1/volumes/{id}/target",
        "/v1/volumes/{id}/replicas",
        "/v1/replicas",
        "/v1/events",
    ] {
        assert!(paths.contains_key(p), "openapi lacks {p}");
    }
    assert!(paths["/v1/volumes/{id}/target"].get("put").is_some());
    // Every operation lists the answers any call can give, as problem documents.
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let mut expected = vec!["401", "500"];
            if path.contains('{') {
                expected.push("404");
            }
            if method != "get" {
                expected.extend(["403", "502", "503", "504"]);
            }
            if op.get("requestBody").is_some() {
                expected.extend(["400", "413", "422"]);
            }
            for status in expected {
                let r = &op["responses"][status];
                assert!(
                    r["content"].get("application/problem+json").is_some(),
                    "{method} {path} does not list {status}"
                );
            }
        }
    }
    assert!(doc["components"]["schemas"].get("Problem").is_some());
    assert!(doc["components"]["schemas"].get("Volume").is_some());
    // The document needs a token; the refusal is an error, not text to save.
    assert_eq!(anon.get_text("/v1/openapi.json").await.unwrap_err().status(), Some(401));
    assert!(trireme_control::openapi_json().contains("/v1/volumes/{id}/target"));

    // Made-up methods share one label, or any client could grow the metrics without bound.
    for m in ["FOO1", "FOO2"] {
        let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
        send(&http, method, &control.url("/v1/volumes"), None, None).await;
    }
    // Metrics need no token and count requests by route and status.
    let m = anon.get_text("/metrics").await.unwrap();
    assert!(!m.contains("FOO1"), "{m}");
    assert!(m.contains("method=\"other\""), "{m}");
    for needle in [
        "trireme_nodes{state=\"online\"} 0",
        "trireme_volumes{state=\"unknown\"} 0",
        "trireme_rest_requests_total{",
        "route=\"/v1/volumes\"",
        "status=\"401\"",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_status_events_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let api = control.admin();
    let n1 = FakeNode::start("node-1", control.grpc).await;
    nodes_online(&api, 1).await;
    pool_online(&api, "pool-1", "node-1", 256 << 20).await;
    let m = api.get_text("/metrics").await.unwrap();
    assert!(
        m.contains(&format!(
            "trireme_pool_capacity_bytes{{pool=\"pool-1\",node=\"node-1\"}} {}",
            256u64 << 20
        )),
        "{m}"
    );
    assert!(m.contains("trireme_pool_used_bytes{pool=\"pool-1\",node=\"node-1\"} 0"), "{m}");
    assert!(m.contains("trireme_nodes{state=\"online\"} 1"), "{m}");

    // The engine reports the pool faulted: so does control, with the reason, and an event.
    {
        let mut st = n1.state.lock();
        let p = st.pools.get_mut("pool-1").unwrap();
        p.state = trireme_rpc::PoolState::Faulted as i32;
        p.error = "bad superblock checksum".into();
    }
    let pool = common::eventually("pool faulted", 30, || async {
        let p = api.pool("pool-1").await.ok()?;
        (p.status.state == trireme_api::PoolState::Faulted).then_some(p)
    })
    .await;
    assert_eq!(pool.status.error.as_deref(), Some("bad superblock checksum"));
    let events = common::eventually("pool event", 30, || async {
        let ev = api.events(None).await.ok()?;
        ev.iter().any(|e| e.reason == "pool_faulted").then_some(ev)
    })
    .await;
    assert!(events.iter().any(|e| e.message.contains("bad superblock checksum")), "{events:?}");
    n1.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_rejects_bad_registrations_and_unknown_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let control = TestControl::start(dir.path()).await;
    let mut grpc =
        trireme_rpc::registry_client::RegistryClient::connect(format!("http://{}", control.grpc))
            .await
            .unwrap();
    let hb =
        grpc.heartbeat(trireme_rpc::HeartbeatRequest { node_id: "ghost".into() }).await.unwrap();
    assert!(!hb.into_inner().known, "an unknown node must register again");
    let bad = grpc
        .register(trireme_rpc::RegisterRequest {
            node_id: "Bad Node".into(),
            grpc_endpoint: "127.0.0.1:1".into(),
            nbd_endpoint: "127.0.0.1:2".into(),
            version: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let ok = grpc
        .register(trireme_rpc::RegisterRequest {
            node_id: "node-9".into(),
            grpc_endpoint: "127.0.0.1:1".into(),
            nbd_endpoint: "127.0.0.1:2".into(),
            version: "x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.heartbeat_interval_secs >= 1);
    let hb =
        grpc.heartbeat(trireme_rpc::HeartbeatRequest { node_id: "node-9".into() }).await.unwrap();
    assert!(hb.into_inner().known);
    let node = control.admin().node("node-9").await.unwrap();
    assert_eq!(node.status.nbd_endpoint, "127.0.0.1:2");
    assert_eq!(node.status.state, trireme_types::NodeState::Online);
    control.stop().await;
}
