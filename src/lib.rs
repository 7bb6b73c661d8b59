//! Herald: a Kubernetes operator that turns Alertmanager alerts and cluster events into
//! webhook notifications.
pub mod alert;
pub mod crd;
pub mod delivery;
pub mod metrics;
pub mod render;
pub mod routing;
pub mod secret;
pub mod herald;
pub mod receiver;
pub mod standalone;
pub mod cli;
