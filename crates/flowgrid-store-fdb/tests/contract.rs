//! The store contract against a live FoundationDB cluster. Built only with the
//! `cluster-tests` feature (it links libfdb_c), which is opt-in: building with it means
//! the suite is meant to run, so without `FDB_CLUSTER_FILE` naming a cluster file the test
//! fails (it never passes without having run).
#![cfg(feature = "cluster-tests")]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowgrid_store::{contract, Error, StoreLimits};
use flowgrid_store_fdb::foundationdb::{self, Database};
use flowgrid_store_fdb::FdbStore;

/// One test: the network thread can be booted once per process.
#[test]
fn fdb_store_passes_the_contract() {
    let cluster_file = match std::env::var("FDB_CLUSTER_FILE") {
        Ok(path) if !path.trim().is_empty() => path,
        _ => panic!(
            "the FoundationDB contract tests did not run: FDB_CLUSTER_FILE is not set. Set FDB_CLUSTER_FILE to a \
             cluster file of a running cluster, or build without --features cluster-tests"
        ),
    };
    // Safety: booted once in this test binary; the guard is dropped after every store.
    let network = unsafe { foundationdb::boot() };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("build a tokio runtime");
    runtime.block_on(async {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos();
        let root = format!("flowgrid-contract/{}-{nanos}", std::process::id());
        let store = FdbStore::open(Some(&cluster_file), &root, StoreLimits::default())
            .await
            .unwrap_or_else(|error| panic!("FDB_CLUSTER_FILE={cluster_file}: {error}"));
        let db = Arc::clone(store.database());

        clear_root(&db, &root).await;
        contract::run_all(|| {
            FdbStore::from_database(Arc::clone(&db), &root, StoreLimits::default()).expect("the test root fits")
        })
        .await;
        clear_root(&db, &root).await;

        // Again with every scan going on in a new transaction after each batch it reads:
        // the paths a long scan takes when it outlasts one transaction's budget.
        let pieces = format!("{root}-p");
        clear_root(&db, &pieces).await;
        contract::run_all(|| {
            FdbStore::from_database(Arc::clone(&db), &pieces, StoreLimits::default())
                .expect("the test root fits")
                .with_scan_budget(Duration::ZERO)
        })
        .await;
        clear_root(&db, &pieces).await;

        // Two owners that share nothing but the cluster: each store on a database handle of
        // its own, both holding one shard.
        let owners = format!("{root}-o");
        contract::a_second_owner_fences_the_first(|| {
            let own = Database::new(Some(&cluster_file))
                .unwrap_or_else(|error| panic!("FDB_CLUSTER_FILE={cluster_file}: {error}"));
            FdbStore::from_database(Arc::new(own), &owners, StoreLimits::default()).expect("the test root fits")
        })
        .await;
        clear_root(&db, &owners).await;

        an_unreachable_cluster_fails_open_naming_its_cluster_file().await;
    });
    drop(runtime);
    drop(network);
}

/// A cluster file whose coordinator nobody listens on: `open` fails within the transaction
/// limit, saying the cluster is unreachable and naming the file.
async fn an_unreachable_cluster_fails_open_naming_its_cluster_file() {
    let path = std::env::temp_dir().join(format!("flowgrid-unreachable-{}.cluster", std::process::id()));
    std::fs::write(&path, "unreachable:test@127.0.0.1:1\n").expect("write a cluster file");
    let path_text = path.to_str().expect("a UTF-8 temporary path");
    let limits = StoreLimits { transaction_ms_max: 1_000, ..StoreLimits::default() };
    let started = std::time::Instant::now();
    let opened = FdbStore::open(Some(path_text), "flowgrid-contract/unreachable", limits).await;
    let _ = std::fs::remove_file(&path);
    match opened {
        Err(Error::Backend(error)) => {
            let message = error.to_string();
            assert!(message.contains("unreachable") && message.contains(path_text), "{message}");
        }
        other => panic!("opening an unreachable cluster must fail with a Backend error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "open took {:?}", started.elapsed());
}

async fn clear_root(db: &Database, root: &str) {
    let (begin, end) = foundationdb::tuple::Subspace::from(&(root,)).range();
    db.run(|trx, _| {
        let (begin, end) = (begin.clone(), end.clone());
        async move {
            trx.clear_range(&begin, &end);
            Ok(())
        }
    })
    .await
    .expect("clear the test root");
}
