//! Measures the latency of small durable commits on the disk holding `--dir` (default: a
//! temporary directory): `cargo run --release -p flowgrid-store-redb --example commit_latency [COMMITS] [DIR]`.

use std::time::{Duration, Instant};

use flowgrid_model::{RunId, ShardId};
use flowgrid_store::{keys, ShardStore, Store, StoreLimits, WriteBatch};
use flowgrid_store_redb::RedbStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let commits: usize = args.next().map(|text| text.parse()).transpose()?.unwrap_or(200);
    let temporary = tempfile::tempdir()?;
    let dir = args.next().map(std::path::PathBuf::from).unwrap_or_else(|| temporary.path().to_path_buf());
    let store = RedbStore::open(&dir, StoreLimits::default())?;
    let shard = store.open_shard(ShardId(0)).await?;
    let epoch = shard.acquire().await?;
    let mut latencies = Vec::with_capacity(commits);
    for seq in 0..commits as u64 {
        let run = RunId(format!("run-{seq}").into());
        let mut batch = WriteBatch::new();
        batch.set(keys::run(&run), vec![1u8; 200]);
        batch.set(keys::active(&run), Vec::new());
        let started = Instant::now();
        shard.commit(epoch, batch).await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let mean = latencies.iter().sum::<Duration>() / commits as u32;
    let at = |quantile: f64| latencies[((commits as f64 * quantile) as usize).min(commits - 1)];
    eprintln!("dir {}", dir.display());
    println!(
        "{commits} durable commits of 2 keys: mean {mean:?}, p50 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        latencies[commits - 1]
    );
    Ok(())
}
