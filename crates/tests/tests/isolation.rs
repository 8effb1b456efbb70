//! Guarantee 3: reads never return another volume's data, and unwritten regions read as
//! zeroes — for thick and thin volumes, including space freed by a deleted volume.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use trireme_iobuf::IoBuf;
use trireme_nbd::{Client, ClientError, ClientOptions};
use trireme_tests::tools::{run_ok, wait_for};
use trireme_tests::{ByteSize, Cluster};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(180);

/// Reads the whole export and returns the offsets of the first few non-zero 4 KiB blocks.
async fn nonzero_blocks(uri: &str, size: u64) -> Vec<u64> {
    let c = Client::connect_uri(uri, ClientOptions::default()).await.unwrap();
    assert_eq!(c.size(), size);
    let mut found = Vec::new();
    let chunk = 4 * MIB;
    let mut off = 0;
    while off < size && found.len() < 10 {
        let data = c.read(off, chunk.min(size - off) as u32).await.unwrap();
        for (i, b) in data.chunks(4096).enumerate() {
            if b.iter().any(|&x| x != 0) {
                found.push(off + i as u64 * 4096);
            }
        }
        off += chunk;
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_volumes_read_zeroes_never_old_data() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let tmp = tempfile::tempdir().unwrap();

    // Fill most of the pool with non-zero data, then delete the volume.
    let big = 160 * MIB;
    let free_before = c.client().pool("pool-1").await.unwrap().status.free;
    let (_, uri) = c.create_published("old", ByteSize::b(big)).await;
    let fill = tmp.path().join("fill.bin");
    std::fs::write(&fill, vec![0xa5u8; big as usize]).unwrap();
    run_ok("nbdcopy", &[fill.to_str().unwrap(), &uri], T).await;
    c.client().unpublish_volume("old").await.unwrap();
    c.client().delete_volume("old").await.unwrap();
    // Deleting may free the replica asynchronously; the space must come back.
    let client = c.client();
    wait_for("the deleted volume's space to be freed", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            let p = client.pool("pool-1").await.map_err(|e| e.to_string())?;
            if p.status.free >= free_before {
                Ok(())
            } else {
                Err(format!("free {} < {free_before}", p.status.free))
            }
        }
    })
    .await;

    // A thick and a thin volume over the freed space read as zeroes everywhere.
    for (name, thin) in [("new-thick", false), ("new-thin", true)] {
        c.create_volume_with(name, ByteSize::b(big / 2), thin).await;
        let uri = c.publish(name).await;
        let dirty = nonzero_blocks(&uri, big / 2).await;
        assert!(dirty.is_empty(), "{name}: a new volume shows old data at offsets {dirty:?}");
    }

    // Sparse writes to a thin volume: only the written blocks read back non-zero, and
    // they read back exactly.
    c.create_volume_with("sparse", ByteSize::mib(32), true).await;
    let uri = c.publish("sparse").await;
    let client = Client::connect_uri(&uri, ClientOptions::default()).await.unwrap();
    let offsets = [0u64, 5 * MIB + 4096, 17 * MIB, 32 * MIB - 4096];
    for (k, off) in offsets.iter().enumerate() {
        client.write(*off, IoBuf::copy_from(&[k as u8 + 1; 4096]), false).await.unwrap();
    }
    client.flush().await.unwrap();
    for (k, off) in offsets.iter().enumerate() {
        assert_eq!(&client.read(*off, 4096).await.unwrap()[..], &[k as u8 + 1; 4096][..]);
    }
    drop(client);
    let dirty = nonzero_blocks(&uri, 32 * MIB).await;
    assert_eq!(dirty, offsets.to_vec(), "unwritten regions of a thin volume are not zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_keeps_data_new_space_reads_zeroes_and_unpublish_stops_serving() {
    let c = Cluster::start(1, ByteSize::mib(256)).await;
    let tmp = tempfile::tempdir().unwrap();
    for thin in [false, true] {
        let name = if thin { "grow-thin" } else { "grow-thick" };
        let (_, uri) = c.create_published(name, ByteSize::mib(16)).await;
        let src = tmp.path().join(format!("{name}.bin"));
        trireme_tests::tools::random_file(&src, (16 * MIB) as usize);
        run_ok("nbdcopy", &[src.to_str().unwrap(), &uri], T).await;

        let v = c.client().resize_volume(name, ByteSize::mib(48)).await.unwrap();
        assert_eq!(v.spec.size, ByteSize::mib(48));
        // Clients see the new size once they reconnect (republish if the target kept the old one).
        let uri = trireme_tests::tools::wait_for(
            &format!("{name} to be served at 48 MiB"),
            Duration::from_secs(60),
            || {
                let c = &c;
                let uri = uri.clone();
                async move {
                    let client = Client::connect_uri(&uri, ClientOptions::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    if client.size() == 48 * MIB {
                        Ok(uri)
                    } else {
                        c.client().unpublish_volume(name).await.map_err(|e| e.to_string())?;
                        let uri = c.publish(name).await;
                        Err(format!("served size {}; republished as {uri}", client.size()))
                    }
                }
            },
        )
        .await;
        let client = Client::connect_uri(&uri, ClientOptions::default()).await.unwrap();
        let head = client.read(0, (16 * MIB) as u32).await.unwrap();
        assert_eq!(
            trireme_tests::tools::sha256_bytes(&head),
            trireme_tests::tools::sha256_file(&src, None),
            "{name}: resize changed the data"
        );
        drop(client);
        let dirty = nonzero_blocks(&uri, 48 * MIB).await;
        assert!(
            dirty.iter().all(|&o| o < 16 * MIB),
            "{name}: the grown space is not zero: {dirty:?}"
        );

        // Unpublished: the export is gone for new clients.
        c.client().unpublish_volume(name).await.unwrap();
        let v = c.client().volume(name).await.unwrap();
        assert!(v.status.target.is_none() && v.spec.publish.is_none(), "{v:?}");
        trireme_tests::tools::wait_for(
            &format!("{name}'s export to disappear"),
            Duration::from_secs(30),
            || async {
                match Client::connect_uri(&uri, ClientOptions::default()).await {
                    // The server's answer to OPT_GO for an export it does not have.
                    Err(ClientError::Handshake { reason, .. })
                        if reason.contains("no such export") =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(format!("unexpected error {e}")),
                    Ok(_) => Err("still served".into()),
                }
            },
        )
        .await;
    }
}
