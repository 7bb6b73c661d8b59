//! The bounded FIFO between the engine and one webhook's worker.
//!
//! A tokio bounded channel allocates about 1.3 KiB when it is created, and a worker task waiting
//! on it about 0.5 KiB more; with one queue per webhook that is 18 MiB for 10,000 mostly idle
//! webhooks. This queue allocates nothing until a job arrives, and it tells the producer when a
//! consumer must be started: a webhook's worker task runs only while its queue holds something.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A bounded multi-producer queue drained by at most one consumer at a time, which exists only
/// while there are items.
pub(crate) struct JobQueue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Wakes a producer waiting for space.
    space: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    /// Places promised to [`Slot`]s and not yet filled.
    reserved: usize,
    closed: bool,
    /// A consumer is draining the queue. Whenever `items` is not empty, this is true.
    consumer: bool,
}

/// Whether the producer that queued an item must start the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub(crate) enum Queued {
    /// A consumer is already draining the queue.
    Running,
    /// No consumer was running: the caller starts one (and is the only one told to).
    StartConsumer,
}

/// A place in the queue, taken before the job exists; given back when dropped unused.
pub(crate) struct Slot<T> {
    queue: Arc<JobQueue<T>>,
    filled: bool,
}

impl<T> JobQueue<T> {
    /// An empty queue holding at most `capacity` items (at least one).
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(JobQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                reserved: 0,
                closed: false,
                consumer: false,
            }),
            capacity: capacity.max(1),
            space: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section leaves the state consistent; a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place without waiting; `None` when the queue is full or closed.
    pub(crate) fn try_reserve(self: &Arc<Self>) -> Option<Slot<T>> {
        let mut state = self.state();
        if state.closed || state.items.len() + state.reserved >= self.capacity {
            return None;
        }
        state.reserved += 1;
        Some(Slot {
            queue: self.clone(),
            filled: false,
        })
    }

    /// Appends an item, waiting for space; gives the item back when the queue is closed.
    pub(crate) async fn push(&self, item: T) -> Result<Queued, T> {
        loop {
            let space = self.space.notified();
            {
                let mut state = self.state();
                if state.closed {
                    return Err(item);
                }
                if state.items.len() + state.reserved < self.capacity {
                    return Ok(state.append(item));
                }
            }
            space.await;
        }
    }

    /// The consumer's next item; when there is none, the consumer is marked as gone (in the same
    /// critical section, so no item is left without one) and must stop.
    pub(crate) fn next_or_stop(&self) -> Option<T> {
        let mut state = self.state();
        let item = state.items.pop_front();
        if item.is_none() {
            state.consumer = false;
        }
        drop(state);
        if item.is_some() {
            self.space.notify_one();
        }
        item
    }

    /// The next item if there is one (for draining a closed queue).
    pub(crate) fn try_pop(&self) -> Option<T> {
        let item = self.state().items.pop_front();
        if item.is_some() {
            self.space.notify_one();
        }
        item
    }

    /// Refuses further items. Returns what was queued when no consumer is running (a running one
    /// drains the queue itself).
    pub(crate) fn close(&self) -> Vec<T> {
        let mut state = self.state();
        state.closed = true;
        let left = if state.consumer {
            Vec::new()
        } else {
            state.items.drain(..).collect()
        };
        drop(state);
        self.space.notify_waiters();
        left
    }
}

impl<T> State<T> {
    fn append(&mut self, item: T) -> Queued {
        self.items.push_back(item);
        if std::mem::replace(&mut self.consumer, true) {
            Queued::Running
        } else {
            Queued::StartConsumer
        }
    }
}

impl<T> Slot<T> {
    /// Fills the place; gives the item back when the queue closed in the meantime.
    pub(crate) fn send(mut self, item: T) -> Result<Queued, T> {
        self.filled = true;
        let mut state = self.queue.state();
        state.reserved -= 1;
        if state.closed {
            return Err(item);
        }
        Ok(state.append(item))
    }
}

impl<T> Drop for Slot<T> {
    fn drop(&mut self) {
        if !self.filled {
            self.queue.state().reserved -= 1;
            self.queue.space.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_fifo_with_reservations() {
        let queue = JobQueue::new(2);
        let first = queue.try_reserve().expect("room");
        assert_eq!(queue.push(1).await, Ok(Queued::StartConsumer));
        assert!(
            queue.try_reserve().is_none(),
            "one reserved + one queued = full"
        );
        drop(first);
        let slot = queue.try_reserve().expect("the unused place came back");
        assert_eq!(slot.send(2), Ok(Queued::Running));
        assert_eq!(queue.next_or_stop(), Some(1));
        assert_eq!(queue.next_or_stop(), Some(2));
        assert_eq!(queue.next_or_stop(), None);
        assert_eq!(
            queue.push(3).await,
            Ok(Queued::StartConsumer),
            "the consumer stopped on the empty queue: the next item starts another"
        );
    }

    #[tokio::test]
    async fn a_waiting_producer_gets_the_freed_place() {
        let queue = JobQueue::new(1);
        assert_eq!(queue.push(1).await, Ok(Queued::StartConsumer));
        let producer = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push(2).await }
        });
        tokio::task::yield_now().await;
        assert!(!producer.is_finished(), "waits while full");
        assert_eq!(queue.next_or_stop(), Some(1));
        assert_eq!(
            producer.await.expect("task"),
            Ok(Queued::Running),
            "the consumer has not stopped yet"
        );
        assert_eq!(queue.next_or_stop(), Some(2));
    }

    #[tokio::test]
    async fn closing_wakes_producers_and_leaves_the_queue_to_its_consumer() {
        let queue = JobQueue::new(1);
        assert_eq!(queue.push(1).await, Ok(Queued::StartConsumer));
        assert!(queue.try_reserve().is_none());
        let producer = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push(2).await }
        });
        tokio::task::yield_now().await;
        assert!(
            queue.close().is_empty(),
            "a consumer is running: it drains the queue"
        );
        assert_eq!(producer.await.expect("task"), Err(2));
        assert_eq!(queue.try_pop(), Some(1));
        assert_eq!(queue.try_pop(), None);
        assert!(queue.try_reserve().is_none());
    }

    #[test]
    fn no_item_is_ever_left_without_a_consumer() {
        // Producers and a consumer that stops whenever it finds the queue empty, from several
        // threads: every item is taken by a consumer some producer was told to start.
        let queue: Arc<JobQueue<u32>> = JobQueue::new(usize::MAX);
        let taken = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let consumers = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for p in 0..4u32 {
                let queue = queue.clone();
                let taken = taken.clone();
                let consumers = &consumers;
                scope.spawn(move || {
                    for i in 0..2_000u32 {
                        let slot = queue.try_reserve().expect("unbounded");
                        if slot.send(p * 10_000 + i) == Ok(Queued::StartConsumer) {
                            let queue = queue.clone();
                            let taken = taken.clone();
                            let consumer = std::thread::spawn(move || {
                                while queue.next_or_stop().is_some() {
                                    taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                }
                            });
                            consumers.lock().expect("list").push(consumer);
                        }
                    }
                });
            }
        });
        for consumer in consumers.into_inner().expect("list") {
            consumer.join().expect("consumer");
        }
        assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), 8_000);
        assert!(queue.close().is_empty(), "nothing left behind");
    }
}
