//! The store contract against a live FoundationDB cluster. Built only with the
//! `cluster-tests` feature (it links libfdb_c); runs only when `FDB_CLUSTER_FILE` names a
//! cluster file, and otherwise says loudly that it did not run.
#![cfg(feature = "cluster-tests")]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use flowgrid_store::{contract, StoreLimits};
use flowgrid_store_fdb::foundationdb::{self, Database};
use flowgrid_store_fdb::FdbStore;

#[test]
fn fdb_contract_requires_cluster_file() {
    let Ok(cluster_file) = std::env::var("FDB_CLUSTER_FILE") else {
        eprintln!("SKIPPED: FoundationDB contract tests need FDB_CLUSTER_FILE pointing at a running cluster");
        return;
    };
    // Safety: booted once in this test binary; the guard is dropped after every store.
    let network = unsafe { foundationdb::boot() };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("build a tokio runtime");
    runtime.block_on(async {
        let db = Arc::new(Database::new(Some(&cluster_file)).expect("open the cluster named by FDB_CLUSTER_FILE"));
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos();
        let root = format!("flowgrid-contract/{}-{nanos}", std::process::id());
        clear_root(&db, &root).await;
        contract::run_all(|| {
            FdbStore::from_database(Arc::clone(&db), &root, StoreLimits::default()).expect("the test root fits")
        })
        .await;
        clear_root(&db, &root).await;
    });
    drop(runtime);
    drop(network);
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
