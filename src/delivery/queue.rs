//! The bounded FIFO between the engine and one webhook's worker.
//!
//! A tokio bounded channel allocates about 1.3 KiB when it is created; with one queue per
//! webhook that is 13 MiB for 10,000 mostly idle webhooks. This queue allocates nothing until a
//! job arrives.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A bounded multi-producer, single-consumer queue.
pub(crate) struct JobQueue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Wakes the consumer: an item arrived or the queue closed.
    available: Notify,
    /// Wakes a producer waiting for space.
    space: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    /// Places promised to [`Slot`]s and not yet filled.
    reserved: usize,
    closed: bool,
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
            }),
            capacity: capacity.max(1),
            available: Notify::new(),
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
    pub(crate) async fn push(&self, item: T) -> Result<(), T> {
        loop {
            let space = self.space.notified();
            {
                let mut state = self.state();
                if state.closed {
                    return Err(item);
                }
                if state.items.len() + state.reserved < self.capacity {
                    state.items.push_back(item);
                    drop(state);
                    self.available.notify_one();
                    return Ok(());
                }
            }
            space.await;
        }
    }

    /// The next item, waiting for one; `None` once the queue is closed.
    pub(crate) async fn pop(&self) -> Option<T> {
        loop {
            let available = self.available.notified();
            if let Some(item) = self.try_pop() {
                return Some(item);
            }
            if self.state().closed {
                return None;
            }
            available.await;
        }
    }

    /// The next item if there is one.
    pub(crate) fn try_pop(&self) -> Option<T> {
        let item = self.state().items.pop_front();
        if item.is_some() {
            self.space.notify_one();
        }
        item
    }

    /// Refuses further items; what is queued can still be taken with [`JobQueue::try_pop`].
    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.available.notify_waiters();
        self.space.notify_waiters();
    }
}

impl<T> Slot<T> {
    /// Fills the place; gives the item back when the queue closed in the meantime.
    pub(crate) fn send(mut self, item: T) -> Result<(), T> {
        self.filled = true;
        let mut state = self.queue.state();
        state.reserved -= 1;
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        drop(state);
        self.queue.available.notify_one();
        Ok(())
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
        queue.push(1).await.expect("open");
        assert!(
            queue.try_reserve().is_none(),
            "one reserved + one queued = full"
        );
        drop(first);
        let slot = queue.try_reserve().expect("the unused place came back");
        assert_eq!(slot.send(2), Ok(()));
        assert_eq!(queue.pop().await, Some(1));
        assert_eq!(queue.pop().await, Some(2));
        assert_eq!(queue.try_pop(), None);
    }

    #[tokio::test]
    async fn a_waiting_producer_gets_the_freed_place() {
        let queue = JobQueue::new(1);
        queue.push(1).await.expect("open");
        let producer = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push(2).await }
        });
        tokio::task::yield_now().await;
        assert!(!producer.is_finished(), "waits while full");
        assert_eq!(queue.pop().await, Some(1));
        producer.await.expect("task").expect("pushed");
        assert_eq!(queue.pop().await, Some(2));
    }

    #[tokio::test]
    async fn closing_wakes_everyone_and_keeps_what_was_queued() {
        let queue = JobQueue::new(1);
        queue.push(1).await.expect("open");
        let slotless = queue.try_reserve();
        assert!(slotless.is_none());
        let producer = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push(2).await }
        });
        tokio::task::yield_now().await;
        queue.close();
        assert_eq!(producer.await.expect("task"), Err(2));
        assert_eq!(queue.try_pop(), Some(1));
        assert_eq!(queue.pop().await, None);
        assert!(queue.try_reserve().is_none());
    }

    #[tokio::test]
    async fn a_consumer_waiting_on_an_empty_queue_wakes_for_a_reserved_send() {
        let queue: Arc<JobQueue<u32>> = JobQueue::new(4);
        let consumer = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop().await }
        });
        tokio::task::yield_now().await;
        let slot = queue.try_reserve().expect("room");
        slot.send(7).expect("open");
        assert_eq!(consumer.await.expect("task"), Some(7));
    }
}
