//! Group commit: writes that concurrent requests ask for, done together.
//!
//! A request hands its job to a [`Group`] and waits for its own answer. The group's task takes
//! what has queued while its earlier writes were in flight (up to a number of jobs and of
//! bytes) and gives it to one call of its writer, which writes it in one statement and
//! transaction and answers each job. A lone job waits for nobody: it is written at once. Per
//! write, PostgreSQL's fixed costs (statement start-up, plan, round trip, commit) are most of
//! the work, so sharing them is what lets a 2-core machine take hundreds more requests a second.
//!
//! Jobs that conflict (for submissions: the same idempotency key) never share a batch: the
//! later one waits for the next, so a writer never has to decide between two in one statement.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use crate::db::Kept;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// What a group writes.
pub trait Job: Send + 'static {
    /// Bytes of content it carries, which bound a batch.
    fn weight(&self) -> usize {
        0
    }
    /// Whether it must not share a batch with `other`.
    fn conflicts(&self, _other: &Self) -> bool {
        false
    }
}

/// A job in a batch, with the way to answer its request.
pub struct Pending<J, R> {
    pub job: J,
    reply: oneshot::Sender<R>,
}

impl<J, R> Pending<J, R> {
    /// Answers the request (which may have gone away: then nobody hears it).
    pub fn answer(self, r: R) {
        let _ = self.reply.send(r);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Jobs in one batch, at most.
    pub jobs: usize,
    /// Bytes in one batch, at most; a bigger job is written alone.
    pub bytes: usize,
    /// Batches being written at once.
    pub concurrency: usize,
}

/// The handle requests hand their jobs to; cheap to clone.
pub struct Group<J, R> {
    jobs: mpsc::Sender<Pending<J, R>>,
}

impl<J, R> Clone for Group<J, R> {
    fn clone(&self) -> Self {
        Group { jobs: self.jobs.clone() }
    }
}

impl<J: Job, R: Send + 'static> Group<J, R> {
    /// Starts the group's task on the current runtime; it ends when the last handle is dropped.
    /// `write` must answer every job of the batch it is given.
    pub fn start<W, F>(limits: Limits, write: W) -> Group<J, R>
    where
        W: Fn(Vec<Pending<J, R>>) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let (jobs, rx) = mpsc::channel(limits.jobs.max(1) * limits.concurrency.max(1) * 4);
        tokio::spawn(collect(rx, limits, write));
        Group { jobs }
    }

    /// Has the job written, with whatever else is waiting; `None` if the group is gone (the
    /// process is stopping) or its writer dropped the job unanswered.
    pub async fn run(&self, job: J) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Pending { job, reply }).await.ok()?;
        answer.await.ok()
    }
}

async fn collect<J: Job, R: Send + 'static, W, F>(mut rx: mpsc::Receiver<Pending<J, R>>, limits: Limits, write: W)
where
    W: Fn(Vec<Pending<J, R>>) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.concurrency.max(1)));
    // Jobs taken from the queue but left for a later batch, in their order.
    let mut waiting: VecDeque<Pending<J, R>> = VecDeque::new();
    loop {
        // A free slot first: what queues meanwhile makes the next batch.
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let first = match waiting.pop_front() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.job.weight();
        let mut batch = vec![first];
        let mut later = VecDeque::new();
        while batch.len() < limits.jobs {
            let Some(p) = waiting.pop_front().or_else(|| rx.try_recv().ok()) else { break };
            if bytes + p.job.weight() > limits.bytes {
                later.push_back(p);
                break;
            }
            if batch.iter().any(|b| b.job.conflicts(&p.job)) {
                later.push_back(p);
                continue;
            }
            bytes += p.job.weight();
            batch.push(p);
        }
        later.extend(waiting.drain(..));
        waiting = later;
        let written = write(batch);
        tokio::spawn(async move {
            written.await;
            drop(permit);
        });
    }
}

/// Writes a batch with `write`, which gives one result per job in order; if the batch fails,
/// writes each job alone, so that one job's fault is its own request's error and no other's.
pub async fn together_or_alone<J, T>(
    conns: &Kept,
    mut batch: Vec<Pending<J, sqlx::Result<T>>>,
    what: &str,
    write: impl for<'a> Fn(&'a Kept, &'a [&'a J]) -> BoxFuture<'a, sqlx::Result<Vec<T>>>,
) {
    let jobs: Vec<&J> = batch.iter().map(|p| &p.job).collect();
    let result = write(conns, &jobs).await;
    drop(jobs);
    match result {
        Ok(results) if results.len() != batch.len() => {
            tracing::error!(
                jobs = batch.len(),
                results = results.len(),
                "a writer of {what} answered the wrong number"
            );
            for p in batch {
                p.answer(Err(sqlx::Error::Protocol(format!(
                    "a batch of {what} was written, but its answers are missing"
                ))));
            }
        }
        Ok(results) => {
            for (p, r) in batch.into_iter().zip(results) {
                p.answer(Ok(r));
            }
        }
        Err(e) if batch.len() == 1 => batch.pop().expect("one job").answer(Err(e)),
        Err(e) => {
            tracing::warn!(jobs = batch.len(), error = %e, "a batch of {what} failed; writing each alone");
            for p in batch {
                let r = write(conns, &[&p.job]).await.and_then(|mut r| r.pop().ok_or(sqlx::Error::RowNotFound));
                p.answer(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Key(u32, usize);

    impl Job for Key {
        fn weight(&self) -> usize {
            self.1
        }
        fn conflicts(&self, other: &Self) -> bool {
            self.0 == other.0
        }
    }

    /// The keys of each batch written, in order.
    type Batches = Arc<Mutex<Vec<Vec<u32>>>>;

    /// Starts a group whose writer records each batch's keys and answers each job with its key.
    fn recording(limits: Limits) -> (Group<Key, u32>, Batches) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let group = Group::start(limits, move |batch: Vec<Pending<Key, u32>>| {
            seen.lock().unwrap().push(batch.iter().map(|p| p.job.0).collect());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                for p in batch {
                    let k = p.job.0;
                    p.answer(k);
                }
            }
        });
        (group, batches)
    }

    #[tokio::test]
    async fn jobs_that_wait_together_are_written_together_and_answered_each() {
        let (group, batches) = recording(Limits { jobs: 64, bytes: 1000, concurrency: 1 });
        let answers = futures_util::future::join_all((0..20).map(|i| group.run(Key(i, 1)))).await;
        assert_eq!(answers, (0..20).map(Some).collect::<Vec<_>>());
        let batches = batches.lock().unwrap();
        assert!(batches.len() < 20, "no batch was shared: {batches:?}");
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 20);
    }

    #[tokio::test]
    async fn conflicting_jobs_and_heavy_ones_are_not_put_together() {
        let (group, batches) = recording(Limits { jobs: 64, bytes: 10, concurrency: 1 });
        let jobs = [Key(1, 1), Key(2, 1), Key(1, 1), Key(3, 9), Key(4, 20), Key(5, 1)];
        let answers = futures_util::future::join_all(jobs.into_iter().map(|k| group.run(k))).await;
        assert_eq!(answers, [1, 2, 1, 3, 4, 5].map(Some));
        for batch in batches.lock().unwrap().iter() {
            assert!(batch.iter().filter(|&&k| k == 1).count() <= 1, "{batch:?}");
            // Over 10 bytes only alone (key 4), and keys 3 (9 bytes) and 4 never share.
            assert!(!(batch.contains(&4) && batch.len() > 1), "{batch:?}");
            let bytes: usize = batch.iter().map(|k| [0, 1, 1, 9, 20, 1][*k as usize]).sum();
            assert!(bytes <= 10 || batch.len() == 1, "{batch:?}");
        }
    }

    #[tokio::test]
    async fn batches_in_flight_are_bounded() {
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (f, m) = (in_flight.clone(), most.clone());
        let group =
            Group::start(Limits { jobs: 2, bytes: 1000, concurrency: 3 }, move |batch: Vec<Pending<Key, ()>>| {
                let (f, m) = (f.clone(), m.clone());
                async move {
                    let now = f.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    m.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    f.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    for p in batch {
                        p.answer(());
                    }
                }
            });
        let answers = futures_util::future::join_all((0..30).map(|i| group.run(Key(i, 0)))).await;
        assert!(answers.iter().all(Option::is_some));
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
