//! One thread for the point reads of a store's shard files.
//!
//! A point read is a few microseconds of redb work. Handed to tokio's blocking pool, each
//! one also paid for a task and a pool thread woken and parked again, which cost more than
//! the read: with a lookup per start (idempotency keys, durable submits) the hand-offs took
//! about a sixth of the coordinator's CPU. Here reads queue for one thread, which takes
//! those that arrive while it works without another wake-up. Range scans, which may be
//! long, stay on the blocking pool, so a point read never waits behind one. The price: a
//! point read that waits for the disk (its pages neither in redb's cache nor the system's)
//! holds up the reads queued behind it.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;

use flowgrid_store::Result;
use tokio::sync::oneshot;

use crate::backend;

type Job = Box<dyn FnOnce() + Send>;

/// The sending side of the reader thread; the thread ends once this is dropped.
pub(crate) struct Reader {
    jobs: mpsc::Sender<Job>,
}

impl Reader {
    pub fn start() -> Reader {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("flowgrid-reader".into())
            .spawn(move || {
                for job in queue {
                    job();
                }
            })
            .expect("the reader thread starts");
        Reader { jobs }
    }

    /// Runs `work` on the reader thread. A panic in it is resumed here, as
    /// `spawn_blocking` would.
    pub async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<std::thread::Result<Result<T>>>();
        let job: Job = Box::new(move || {
            let _ = reply.send(panic::catch_unwind(AssertUnwindSafe(work)));
        });
        if self.jobs.send(job).is_err() {
            return Err(stopped());
        }
        match answer.await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => panic::resume_unwind(panic),
            Err(_) => Err(stopped()),
        }
    }
}

fn stopped() -> flowgrid_store::Error {
    backend(std::io::Error::other(
        "the store's reader thread has stopped, so no shard file can be read; restart the coordinator",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_run_on_the_reader_thread_and_their_panics_reach_the_caller() {
        let reader = Reader::start();
        let name = reader.run(|| Ok(std::thread::current().name().map(str::to_owned))).await.unwrap();
        assert_eq!(name.as_deref(), Some("flowgrid-reader"));
        let failed = reader.run(|| -> Result<()> { Err(backend(std::io::Error::other("disk"))) }).await;
        assert!(failed.unwrap_err().to_string().contains("disk"));
        let panicked = tokio::spawn(async move { reader.run(|| -> Result<()> { panic!("in a read") }).await });
        let error = panicked.await.unwrap_err();
        assert!(error.is_panic(), "the read's panic is resumed in the caller");
    }
}
