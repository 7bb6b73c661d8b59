//! The FIFO between the engine and one webhook's worker.
//!
//! A tokio channel allocates about 1.3 KiB when it is created, and a worker task waiting on it
//! about 0.5 KiB more; with one queue per webhook that is 18 MiB for 10,000 mostly idle
//! webhooks. This queue allocates nothing until a job arrives, and it tells the producer when a
//! consumer must be started: a webhook's worker task runs only while its queue holds something
//! or its backlog in the store holds more.
//!
//! With a memory store the queue holds the webhook's whole backlog. With a disk store it holds
//! only what feeds the worker: producers store deliveries and say so ([`JobQueue::stored`]);
//! the consumer, finding the queue empty, is told to load the next part of the backlog after
//! the last sequence number it loaded ([`Next::Load`]).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

/// A multi-producer queue drained by at most one consumer at a time, which exists only while
/// there is work.
pub(crate) struct JobQueue<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// A consumer is running. Whenever `items` is not empty or `on_disk` is set, this is true.
    consumer: bool,
    /// The store may hold deliveries after `cursor` that are not in `items`.
    on_disk: bool,
    /// The last sequence number loaded from the store (or handed over right after it was
    /// stored, see [`JobQueue::hand_over`]).
    cursor: u64,
    /// The consumer is loading (between [`JobQueue::begin_load`] and [`JobQueue::loaded`]).
    loading: bool,
    /// Items handed over while a load is under way, with their sequence numbers: queued after
    /// the load's items when the load read everything before them (see [`JobQueue::loaded`]).
    arrived: VecDeque<(u64, T)>,
}

/// Whether the producer that queued an item must start the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub(crate) enum Queued {
    /// A consumer is already running.
    Running,
    /// No consumer was running: the caller starts one (and is the only one told to).
    StartConsumer,
}

/// What the consumer does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next<T> {
    /// Handle this item.
    Item(T),
    /// Load the backlog: once there is room for what the load brings, say so with
    /// [`JobQueue::begin_load`], which tells where to read from, and hand what was read to
    /// [`JobQueue::loaded`].
    Load,
    /// Nothing more: the consumer is marked as gone and must stop.
    Stop,
}

impl<T> JobQueue<T> {
    /// An empty queue.
    pub(crate) fn new() -> Self {
        JobQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
                consumer: false,
                on_disk: false,
                cursor: 0,
                loading: false,
                arrived: VecDeque::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section leaves the state consistent; a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an item; gives it back when the queue is closed.
    pub(crate) fn push(&self, item: T) -> Result<Queued, T> {
        let mut state = self.state();
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        Ok(state.claim_consumer())
    }

    /// Says that the store holds new deliveries for this queue; `None` when it is closed.
    pub(crate) fn stored(&self) -> Option<Queued> {
        let mut state = self.state();
        if state.closed {
            return None;
        }
        state.on_disk = true;
        Some(state.claim_consumer())
    }

    /// The consumer's next step. When there is nothing, the consumer is marked as gone (in the
    /// same critical section, so no work is left without one) and must stop.
    pub(crate) fn next(&self) -> Next<T> {
        let mut state = self.state();
        if let Some(item) = state.items.pop_front() {
            return Next::Item(item);
        }
        if state.on_disk && !state.closed {
            return Next::Load;
        }
        state.consumer = false;
        Next::Stop
    }

    /// Starts the load that [`Next::Load`] asked for: returns the last sequence number loaded
    /// so far, after which the load reads. Items handed over from now on wait for the load's
    /// end.
    pub(crate) fn begin_load(&self) -> u64 {
        let mut state = self.state();
        state.on_disk = false;
        state.loading = true;
        state.cursor
    }

    /// What a [`Next::Load`] found: the items, the sequence number of the last one, and whether
    /// more may follow (the load was cut at its limit). The items handed over during the load
    /// follow them when the load read everything stored before them: it was not cut, and
    /// nothing else was stored for the queue meanwhile. Otherwise they are left to the next load.
    pub(crate) fn loaded(&self, items: Vec<T>, last: Option<u64>, more: bool) {
        let mut state = self.state();
        state.loading = false;
        state.items.extend(items);
        if let Some(last) = last {
            state.cursor = state.cursor.max(last);
        }
        state.on_disk |= more;
        let arrived = std::mem::take(&mut state.arrived);
        if !state.on_disk {
            for (seq, item) in arrived {
                // One the load read already is dropped.
                if seq > state.cursor {
                    state.items.push_back(item);
                    state.cursor = seq;
                }
            }
        }
    }

    /// Asks the consumer to load again (a load that failed).
    pub(crate) fn reload(&self) {
        let mut state = self.state();
        state.loading = false;
        state.on_disk = true;
        state.arrived.clear();
    }

    /// Hands over an item just stored with sequence number `seq`, so that the consumer need not
    /// read it back. Callers hand over a webhook's items in the order of their sequence numbers,
    /// each once it is stored, and say [`JobQueue::stored`] of those they do not hand over.
    /// The item is queued when the queue holds everything stored before it (nothing left to
    /// load), and the cursor moves to it; while a load is under way it waits for the load's
    /// end (see [`JobQueue::loaded`]). Otherwise it is dropped: the store holds items before it,
    /// so the next load reads it, or it was loaded already. `None` when the queue is closed
    /// (the item stays in the store).
    pub(crate) fn hand_over(&self, seq: u64, item: T) -> Option<Queued> {
        let mut state = self.state();
        if state.closed {
            return None;
        }
        if seq > state.cursor && !state.on_disk {
            if state.loading {
                state.arrived.push_back((seq, item));
            } else {
                state.items.push_back(item);
                state.cursor = seq;
            }
        }
        Some(state.claim_consumer())
    }

    /// Whether [`JobQueue::hand_over`] would keep an item now rather than leave it to a load.
    pub(crate) fn takes_hand_over(&self) -> bool {
        let state = self.state();
        !state.closed && !state.on_disk
    }

    /// The next item if there is one (for draining a closed queue).
    pub(crate) fn try_pop(&self) -> Option<T> {
        self.state().items.pop_front()
    }

    /// Refuses further items. Returns what was queued when no consumer is running (a running one
    /// drains the queue itself).
    pub(crate) fn close(&self) -> Vec<T> {
        let mut state = self.state();
        state.closed = true;
        if state.consumer {
            Vec::new()
        } else {
            state.items.drain(..).collect()
        }
    }
}

impl<T> State<T> {
    fn claim_consumer(&mut self) -> Queued {
        if std::mem::replace(&mut self.consumer, true) {
            Queued::Running
        } else {
            Queued::StartConsumer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fifo_that_asks_for_a_consumer_once() {
        let queue = JobQueue::new();
        assert_eq!(queue.push(1), Ok(Queued::StartConsumer));
        assert_eq!(queue.push(2), Ok(Queued::Running));
        assert_eq!(queue.next(), Next::Item(1));
        assert_eq!(queue.next(), Next::Item(2));
        assert_eq!(queue.next(), Next::Stop);
        assert_eq!(
            queue.push(3),
            Ok(Queued::StartConsumer),
            "the consumer stopped on the empty queue: the next item starts another"
        );
    }

    #[test]
    fn the_consumer_loads_the_backlog_after_its_cursor() {
        let queue = JobQueue::new();
        assert_eq!(queue.stored(), Some(Queued::StartConsumer));
        assert_eq!(queue.stored(), Some(Queued::Running));
        assert_eq!(queue.next(), Next::Load);
        assert_eq!(queue.begin_load(), 0);
        // A load cut at its limit: more to load after the last one.
        queue.loaded(vec![10, 11], Some(11), true);
        assert_eq!(queue.next(), Next::Item(10));
        assert_eq!(queue.next(), Next::Item(11));
        assert_eq!(queue.next(), Next::Load);
        assert_eq!(queue.begin_load(), 11);
        // Stored while loading: loaded again even though this load was not cut.
        assert_eq!(queue.stored(), Some(Queued::Running));
        queue.loaded(vec![12], Some(12), false);
        assert_eq!(queue.next(), Next::Item(12));
        assert_eq!(queue.next(), Next::Load);
        assert_eq!(queue.begin_load(), 12);
        queue.loaded(Vec::new(), None, false);
        assert_eq!(queue.next(), Next::Stop);
        assert_eq!(queue.stored(), Some(Queued::StartConsumer));
    }

    #[test]
    fn items_handed_over_skip_the_load_only_while_nothing_waits_in_the_store() {
        let queue = JobQueue::new();
        assert_eq!(queue.hand_over(5, 5), Some(Queued::StartConsumer));
        assert_eq!(queue.next(), Next::Item(5));
        // Stored while the queue was behind: left to the load, which reads after 5.
        assert_eq!(queue.stored(), Some(Queued::Running));
        assert_eq!(queue.hand_over(7, 7), Some(Queued::Running));
        assert_eq!(queue.next(), Next::Load);
        assert_eq!(queue.begin_load(), 5);
        // Handed over while the load runs, and read by it too: queued once.
        assert_eq!(queue.hand_over(9, 9), Some(Queued::Running));
        queue.loaded(vec![6, 7, 9], Some(9), false);
        // Loaded already (its hand-over came after the load that read it).
        assert_eq!(queue.hand_over(8, 8), Some(Queued::Running));
        assert_eq!(queue.next(), Next::Item(6));
        assert_eq!(queue.next(), Next::Item(7));
        assert_eq!(queue.next(), Next::Item(9));
        assert_eq!(queue.next(), Next::Stop);
        assert_eq!(queue.hand_over(10, 10), Some(Queued::StartConsumer));
        assert_eq!(queue.next(), Next::Item(10));
    }

    #[test]
    fn items_handed_over_during_a_load_follow_it_when_it_read_everything_before_them() {
        let queue = JobQueue::new();
        assert_eq!(queue.stored(), Some(Queued::StartConsumer));
        assert_eq!(queue.next(), Next::Load);
        assert_eq!(queue.begin_load(), 0);
        assert_eq!(queue.hand_over(3, 3), Some(Queued::Running));
        assert!(queue.takes_hand_over());
        queue.loaded(vec![1, 2], Some(2), false);
        assert_eq!(queue.next(), Next::Item(1));
        assert_eq!(queue.next(), Next::Item(2));
        assert_eq!(queue.next(), Next::Item(3));
        // Handed over again after the load: queued at once.
        assert_eq!(queue.hand_over(4, 4), Some(Queued::Running));
        assert_eq!(queue.next(), Next::Item(4));
        assert_eq!(queue.next(), Next::Stop);

        // A load cut at its limit: what came during it is read by the next one.
        assert_eq!(queue.stored(), Some(Queued::StartConsumer));
        assert_eq!(queue.next(), Next::Load);
        assert_eq!(queue.begin_load(), 4);
        assert_eq!(queue.hand_over(7, 7), Some(Queued::Running));
        queue.loaded(vec![5, 6], Some(6), true);
        assert_eq!(queue.next(), Next::Item(5));
        assert_eq!(queue.next(), Next::Item(6));
        assert_eq!(queue.next(), Next::Load);
        assert_eq!(queue.begin_load(), 6);

        // Stored without a hand-over during the load (no room): the next load reads it and
        // everything after it.
        assert_eq!(queue.hand_over(8, 8), Some(Queued::Running));
        assert_eq!(queue.stored(), Some(Queued::Running));
        assert!(!queue.takes_hand_over());
        assert_eq!(queue.hand_over(10, 10), Some(Queued::Running));
        queue.loaded(vec![7], Some(7), false);
        assert_eq!(queue.next(), Next::Item(7));
        assert_eq!(queue.next(), Next::Load);
        assert_eq!(queue.begin_load(), 7);

        // A load that failed: what came during it is read by the next one.
        assert_eq!(queue.hand_over(11, 11), Some(Queued::Running));
        queue.reload();
        assert_eq!(queue.next(), Next::Load);
        assert_eq!(queue.begin_load(), 7);
        queue.loaded(vec![8, 9, 10, 11], Some(11), false);
        for item in 8..=11 {
            assert_eq!(queue.next(), Next::Item(item));
        }
        assert_eq!(queue.next(), Next::Stop);
    }

    #[test]
    fn closing_leaves_the_queue_to_its_consumer() {
        let queue = JobQueue::new();
        assert_eq!(queue.push(1), Ok(Queued::StartConsumer));
        assert!(
            queue.close().is_empty(),
            "a consumer is running: it drains the queue"
        );
        assert_eq!(queue.push(2), Err(2));
        assert_eq!(queue.stored(), None);
        assert_eq!(queue.try_pop(), Some(1));
        assert_eq!(queue.try_pop(), None);
    }

    #[test]
    fn no_item_is_ever_left_without_a_consumer() {
        // Producers and a consumer that stops whenever it finds the queue empty, from several
        // threads: every item is taken by a consumer some producer was told to start.
        let queue: Arc<JobQueue<u32>> = Arc::new(JobQueue::new());
        let taken = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let consumers = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for p in 0..4u32 {
                let queue = queue.clone();
                let taken = taken.clone();
                let consumers = &consumers;
                scope.spawn(move || {
                    for i in 0..2_000u32 {
                        if queue.push(p * 10_000 + i) == Ok(Queued::StartConsumer) {
                            let queue = queue.clone();
                            let taken = taken.clone();
                            let consumer = std::thread::spawn(move || {
                                while let Next::Item(_) = queue.next() {
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
