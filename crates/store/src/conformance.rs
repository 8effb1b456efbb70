#![allow(clippy::unwrap_used, clippy::panic)]
//! The behaviour every [`Store`] backend must show (Garage runs one suite over each database
//! adapter; so do we). Panics on the first deviation, so call it from a test.

use crate::{Compare, Store, StoreError, Txn, TxnOutcome};

/// Runs every check against an empty store. Panics (with a message) on the first failure.
pub async fn conformance_suite(store: &dyn Store) {
    // get/put/overwrite
    assert_eq!(store.get("a/1").await.unwrap(), None, "empty store has no keys");
    let r1 = store.put("a/1", b"one".to_vec()).await.unwrap();
    assert!(r1 > 0, "revisions start above zero");
    let got = store.get("a/1").await.unwrap().unwrap();
    assert_eq!(got.value, b"one");
    assert_eq!(got.revision, r1);
    let r2 = store.put("a/1", b"uno".to_vec()).await.unwrap();
    assert!(r2 > r1, "every write bumps the revision");
    assert_eq!(store.get("a/1").await.unwrap().unwrap().value, b"uno");

    // binary values and empty values survive
    store.put("bin", vec![0, 255, 0, 1]).await.unwrap();
    assert_eq!(store.get("bin").await.unwrap().unwrap().value, vec![0, 255, 0, 1]);
    store.put("empty", Vec::new()).await.unwrap();
    assert_eq!(store.get("empty").await.unwrap().unwrap().value, Vec::<u8>::new());

    // prefix listing is ordered and exact
    store.put("a/3", b"3".to_vec()).await.unwrap();
    store.put("a/2", b"2".to_vec()).await.unwrap();
    store.put("ab", b"not a child".to_vec()).await.unwrap();
    store.put("b/1", b"x".to_vec()).await.unwrap();
    let keys: Vec<String> = store.list("a/").await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["a/1", "a/2", "a/3"]);
    assert!(store.list("zzz/").await.unwrap().is_empty());
    assert_eq!(store.list("").await.unwrap().len(), 7, "the empty prefix lists everything");

    // delete
    assert!(store.delete("a/2").await.unwrap());
    assert!(!store.delete("a/2").await.unwrap(), "deleting twice reports absence");
    assert_eq!(store.get("a/2").await.unwrap(), None);

    // create-if-absent
    let created = store
        .txn(Txn::new().when(Compare::Absent("c/1".into())).put("c/1", b"first".to_vec()))
        .await
        .unwrap();
    assert!(created.committed());
    let again = store
        .txn(Txn::new().when(Compare::Absent("c/1".into())).put("c/1", b"second".to_vec()))
        .await
        .unwrap();
    assert_eq!(again, TxnOutcome::Failed { compare: 0 });
    assert_eq!(
        store.get("c/1").await.unwrap().unwrap().value,
        b"first",
        "a failed txn writes nothing"
    );

    // compare-and-swap on the revision
    let cur = store.get("c/1").await.unwrap().unwrap();
    let swapped = store
        .txn(
            Txn::new()
                .when(Compare::Revision("c/1".into(), cur.revision))
                .put("c/1", b"v2".to_vec()),
        )
        .await
        .unwrap();
    let TxnOutcome::Committed { revision } = swapped else {
        panic!("CAS on the current revision must commit")
    };
    assert_eq!(store.get("c/1").await.unwrap().unwrap().revision, revision);
    let stale = store
        .txn(
            Txn::new()
                .when(Compare::Revision("c/1".into(), cur.revision))
                .put("c/1", b"v3".to_vec()),
        )
        .await
        .unwrap();
    assert!(!stale.committed(), "CAS on a stale revision must fail");
    assert!(
        !store.txn(Txn::new().when(Compare::Revision("nope".into(), 1))).await.unwrap().committed(),
        "a revision compare on a missing key fails"
    );

    // atomicity: every op or none, across keys, with several compares
    let outcome = store
        .txn(
            Txn::new()
                .when(Compare::Present("c/1".into()))
                .when(Compare::Absent("a/1".into())) // fails: a/1 exists
                .put("d/1", b"x".to_vec())
                .delete("c/1"),
        )
        .await
        .unwrap();
    assert_eq!(outcome, TxnOutcome::Failed { compare: 1 });
    assert_eq!(store.get("d/1").await.unwrap(), None);
    assert!(store.get("c/1").await.unwrap().is_some());
    let outcome = store
        .txn(
            Txn::new()
                .when(Compare::Present("c/1".into()))
                .put("d/1", b"x".to_vec())
                .put("d/2", b"y".to_vec())
                .delete("c/1")
                .delete("never-existed"),
        )
        .await
        .unwrap();
    let TxnOutcome::Committed { revision } = outcome else { panic!("txn must commit") };
    assert_eq!(store.get("c/1").await.unwrap(), None);
    assert_eq!(store.get("d/1").await.unwrap().unwrap().revision, revision, "one revision per txn");
    assert_eq!(store.get("d/2").await.unwrap().unwrap().revision, revision);

    // an empty txn commits and writes nothing
    assert!(store.txn(Txn::new()).await.unwrap().committed());

    // empty keys are refused, not stored
    assert!(matches!(store.put("", b"x".to_vec()).await, Err(StoreError::EmptyKey)));

    // concurrent creates of one key: exactly one wins
    let mut wins = 0;
    let results = futures_join_all(store, 8).await;
    for r in results {
        if r.committed() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1, "exactly one concurrent create-if-absent wins");
}

async fn futures_join_all(store: &dyn Store, n: usize) -> Vec<TxnOutcome> {
    let mut set = Vec::with_capacity(n);
    for i in 0..n {
        set.push(
            store.txn(
                Txn::new()
                    .when(Compare::Absent("race".into()))
                    .put("race", format!("{i}").into_bytes()),
            ),
        );
    }
    let mut out = Vec::with_capacity(n);
    // Polled together so that the backend sees them concurrently.
    let joined = join_all(set).await;
    for r in joined {
        out.push(r.unwrap());
    }
    out
}

/// A tiny `join_all` so this crate does not need `futures`.
async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}
