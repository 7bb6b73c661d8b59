//! Delivery: one worker and one bounded queue per webhook, each rendering, signing, sending and
//! retrying on its own, so a slow or dead endpoint touches nobody else.

pub mod client;
mod engine;
pub mod pace;
pub mod policy;
mod queue;
mod send;
pub mod target;

pub use engine::{
    BacklogState, DeliveryObserver, DeliveryReport, Engine, EngineConfig, Overloaded, ReplayError,
    RetryPolicy, SubmitError, SubmitSummary,
};
pub use policy::{DestinationPolicy, DestinationRule};
pub use send::{AttemptClass, AttemptResult, LOOP_HEADER, send, sign};
pub use target::{Target, TargetPolicy, USER_AGENT, parse_signing_secrets, referenced_secrets};
