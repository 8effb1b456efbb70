//! The REST surface beyond errors: idempotent creates (by name and by client-supplied id),
//! the OpenAPI document, health, metrics and events.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use trireme_api::CreateVolumeBody;
use trireme_tests::tools::wait_for;
use trireme_tests::{ByteSize, Cluster};
use trireme_types::{Name, VolumeId};

fn body(name: &str, size: ByteSize, id: Option<VolumeId>) -> CreateVolumeBody {
    CreateVolumeBody { name: Name::new(name).unwrap(), id, size, replicas: 1, thin: false }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_idempotent_and_the_api_describes_itself() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let client = c.client();

    // Same name, same spec: the same volume, not a second one (CSI retries).
    let a = client.create_volume(&body("idem", ByteSize::mib(16), None)).await.unwrap();
    let again = client.create_volume(&body("idem", ByteSize::mib(16), None)).await.unwrap();
    assert_eq!(a.id, again.id);
    // Same name, different spec: a conflict that says why.
    let err = client.create_volume(&body("idem", ByteSize::mib(32), None)).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    // A client-supplied id is kept, and a retry with it is idempotent too.
    let id = VolumeId::new_random();
    let b = client.create_volume(&body("with-id", ByteSize::mib(8), Some(id))).await.unwrap();
    assert_eq!(b.id, id);
    let b2 = client.create_volume(&body("with-id", ByteSize::mib(8), Some(id))).await.unwrap();
    assert_eq!(b2.id, id);
    let vols = client.volumes().await.unwrap();
    assert_eq!(vols.len(), 2, "{vols:?}");
    // Pool status is observed, so give it time to converge, then hold it to exactly 2.
    let cl = client.clone();
    let observed = wait_for("pool-1 to report 2 replicas", Duration::from_secs(60), || {
        let cl = cl.clone();
        async move {
            let p = cl.pool("pool-1").await.map_err(|e| e.to_string())?;
            if p.status.replicas >= 2 { Ok(p) } else { Err(format!("{:?}", p.status)) }
        }
    })
    .await;
    assert_eq!(observed.status.replicas, 2, "retried creates made extra replicas: {observed:?}");
    assert_eq!(client.replicas(None).await.unwrap().len(), 2);

    // Get by id and by name agree.
    assert_eq!(
        client.volume(&id.to_string()).await.unwrap(),
        client.volume("with-id").await.unwrap()
    );

    // Health, OpenAPI, metrics and events.
    assert_eq!(client.health().await.unwrap().status, "ok");
    let doc: serde_json::Value =
        serde_json::from_str(&client.get_text("/v1/openapi.json").await.unwrap()).unwrap();
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not OpenAPI 3: {}",
        doc["openapi"]
    );
    for path in
        ["/v1/volumes", "/v1/volumes/{id}", "/v1/volumes/{id}/target", "/v1/nodes", "/v1/pools"]
    {
        assert!(doc["paths"].get(path).is_some(), "the OpenAPI document lacks {path}");
    }
    let metrics = client.get_text("/metrics").await.unwrap();
    assert!(metrics.contains("trireme_pool_capacity_bytes{"), "{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("trireme_nodes{state=\"online\"} 1")),
        "{metrics}"
    );
    let events = client.events(None).await.unwrap();
    assert!(
        events.iter().any(|e| e.kind == "volume" && e.id.contains(&a.id.to_string())
            || e.message.contains("idem")),
        "no event about volume idem: {events:?}"
    );
    let last = events.last().unwrap().seq;
    assert!(client.events(Some(last)).await.unwrap().is_empty());
    client.delete_volume("idem").await.unwrap();
    let newer = client.events(Some(last)).await.unwrap();
    assert!(!newer.is_empty() && newer.iter().all(|e| e.seq > last), "{newer:?}");
    // Delete is idempotent in effect: the volume is gone, a second delete says so.
    assert!(client.volume("idem").await.unwrap_err().is_not_found());
}
