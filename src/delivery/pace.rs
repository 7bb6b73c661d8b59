//! Pacing per destination URL, and the gathering of queued deliveries into one merged message
//! (a digest) while a robot is paced or a webhook's batching window is open.
//!
//! A [`Pacer`] is a token bucket per window (per second, per minute): it holds as many tokens
//! as the window allows, each message takes one, and a token comes back one window (and a
//! twentieth, for the time a request takes to reach the platform) after it was taken. So no
//! window of that length ever sees more messages than the platform takes, however the sends
//! bunch up. Every Webhook with the same URL shares one pacer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Limits of one destination: at most `max` messages in any `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// The window's length.
    pub per: Duration,
    /// Messages allowed in it.
    pub max: u32,
}

impl Window {
    /// How long a token stays taken: the window and a margin for the time between taking it
    /// and the platform counting the message (a request in flight, a busy sender).
    fn hold(&self) -> Duration {
        self.per + self.per / 20
    }
}

/// A destination's pace: the tokens of each window, and a block the platform asked for.
#[derive(Debug)]
pub struct Pacer {
    state: Mutex<PacerState>,
}

#[derive(Debug)]
struct PacerState {
    windows: Vec<Window>,
    /// Per window, when each token taken within the last window was taken (oldest first).
    taken: Vec<VecDeque<Instant>>,
    /// No message before this (the platform said it blocks us until then).
    blocked_until: Option<Instant>,
}

impl Pacer {
    fn new(windows: Vec<Window>) -> Self {
        let taken = windows.iter().map(|_| VecDeque::new()).collect();
        Pacer {
            state: Mutex::new(PacerState {
                windows,
                taken,
                blocked_until: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PacerState> {
        // The state is consistent after any panic: each field is replaced whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a token for a message now, or says how long until one comes back.
    pub fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state();
        if let Some(until) = state.blocked_until {
            if until > now {
                return Err(until - now);
            }
            state.blocked_until = None;
        }
        let PacerState { windows, taken, .. } = &mut *state;
        let mut wait = Duration::ZERO;
        for (window, taken) in windows.iter().zip(taken.iter_mut()) {
            while taken
                .front()
                .is_some_and(|at| now.saturating_duration_since(*at) >= window.hold())
            {
                taken.pop_front();
            }
            if taken.len() >= window.max as usize
                && let Some(oldest) = taken.front()
            {
                wait = wait.max(window.hold() - now.saturating_duration_since(*oldest));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for taken in taken.iter_mut() {
            taken.push_back(now);
        }
        Ok(())
    }

    /// The platform blocks this destination for `wait`: no message before it is over.
    pub fn block_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut state = self.state();
        state.blocked_until = Some(state.blocked_until.map_or(until, |b| b.max(until)));
    }

    fn set_windows(&self, windows: Vec<Window>) {
        let mut state = self.state();
        if state.windows != windows {
            state.taken = windows.iter().map(|_| VecDeque::new()).collect();
            state.windows = windows;
        }
    }
}

/// Pacers in use, by destination URL.
static PACERS: std::sync::LazyLock<Mutex<HashMap<String, Weak<Pacer>>>> =
    std::sync::LazyLock::new(Default::default);

/// The pacer of a destination URL with these windows, shared by every target with the URL
/// (the windows last given apply to all of them).
pub fn pacer_for(url: &str, windows: Vec<Window>) -> Arc<Pacer> {
    let mut pacers = PACERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pacer) = pacers.get(url).and_then(Weak::upgrade) {
        pacer.set_windows(windows);
        return pacer;
    }
    let pacer = Arc::new(Pacer::new(windows));
    pacers.retain(|_, weak| weak.strong_count() > 0);
    pacers.insert(url.to_string(), Arc::downgrade(&pacer));
    pacer
}

/// Waits until the pacer gives a token (and takes it). False when cancelled first.
pub(crate) async fn take_turn(pacer: &Pacer, cancel: &CancellationToken) -> bool {
    loop {
        let wait = match pacer.try_take(Instant::now()) {
            Ok(()) => return true,
            Err(wait) => wait,
        };
        tokio::select! {
            () = cancel.cancelled() => return false,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// A webhook's batching window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Longest the first gathered alert waits.
    pub max_wait: Duration,
    /// Send once this many alerts are gathered.
    pub max_alerts: usize,
}

/// Most alerts in one merged message while paced (more wait for the next one).
pub const DIGEST_MAX_ALERTS: usize = 500;

/// How often a waiting worker moves what was queued into its gathering (so that its queue,
/// and what it refuses when full, stays small while it waits).
const GATHER_POLL: Duration = Duration::from_millis(100);

/// Deliveries a worker took from its queue and holds until its pace or batching window lets
/// them go, as one merged message.
#[derive(Debug)]
pub(crate) struct Gathering<T> {
    held: VecDeque<(T, usize)>,
    /// When the oldest held item was taken.
    since: Option<Instant>,
}

impl<T> Default for Gathering<T> {
    fn default() -> Self {
        Gathering {
            held: VecDeque::new(),
            since: None,
        }
    }
}

impl<T> Gathering<T> {
    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Holds an item carrying `alerts` alerts.
    pub(crate) fn push(&mut self, item: T, alerts: usize) {
        self.since.get_or_insert_with(Instant::now);
        self.held.push_back((item, alerts));
    }

    fn alerts(&self) -> usize {
        self.held.iter().map(|(_, n)| n).sum()
    }

    /// Waits until the held items may go: the batching window is over (or full) and the pacer
    /// gives a token. Meanwhile, whatever `pull` yields (the worker's queue) joins them. False
    /// when cancelled first.
    pub(crate) async fn wait(
        &mut self,
        pacer: Option<&Pacer>,
        batching: Option<Batching>,
        mut pull: impl FnMut() -> Option<(T, usize)>,
        cancel: &CancellationToken,
    ) -> bool {
        loop {
            while let Some((item, alerts)) = pull() {
                self.push(item, alerts);
            }
            let now = Instant::now();
            let batch_wait = match (batching, self.since) {
                (Some(b), Some(since)) if self.alerts() < b.max_alerts => {
                    (since + b.max_wait).saturating_duration_since(now)
                }
                _ => Duration::ZERO,
            };
            let wait = if !batch_wait.is_zero() {
                batch_wait
            } else {
                match pacer.map(|p| p.try_take(now)) {
                    None | Some(Ok(())) => return true,
                    Some(Err(wait)) => wait,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(wait.min(GATHER_POLL)) => {}
            }
        }
    }

    /// The items of the next message: the oldest held, up to `max_alerts` alerts (at least
    /// one item).
    pub(crate) fn next_message(&mut self, max_alerts: usize) -> Vec<T> {
        let mut out = Vec::new();
        let mut alerts = 0;
        while let Some((_, n)) = self.held.front() {
            if !out.is_empty() && alerts + n > max_alerts {
                break;
            }
            alerts += n;
            if let Some((item, _)) = self.held.pop_front() {
                out.push(item);
            }
        }
        self.since = if self.held.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        out
    }

    /// Everything held, for a worker that stops.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.since = None;
        self.held.drain(..).map(|(item, _)| item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_window_ever_sees_more_than_its_tokens() {
        let pacer = Pacer::new(vec![Window {
            per: Duration::from_secs(60),
            max: 20,
        }]);
        let start = Instant::now();
        let mut sent = Vec::new();
        // Try to send every 100 ms for five minutes.
        for step in 0..3000u64 {
            let now = start + Duration::from_millis(step * 100);
            if pacer.try_take(now).is_ok() {
                sent.push(now);
            }
        }
        for (i, at) in sent.iter().enumerate() {
            let in_window = sent[i..]
                .iter()
                .take_while(|t| t.duration_since(*at) < Duration::from_secs(60))
                .count();
            assert!(in_window <= 20, "{in_window} sends within a minute");
        }
        assert_eq!(sent.len(), 100, "20 a minute for five minutes");
        let blocked = Pacer::new(vec![]);
        blocked.block_for(Duration::from_secs(5));
        assert!(blocked.try_take(Instant::now()).is_err());
    }

    #[test]
    fn a_message_takes_the_oldest_items_up_to_the_alert_cap() {
        let mut gathering = Gathering::default();
        for (item, alerts) in [("a", 3), ("b", 3), ("c", 3)] {
            gathering.push(item, alerts);
        }
        assert_eq!(gathering.next_message(6), ["a", "b"]);
        assert_eq!(gathering.next_message(1), ["c"], "at least one item");
        assert!(gathering.is_empty());
    }
}
