//! Herald: a Kubernetes operator that turns Alertmanager alerts and cluster events into
//! webhook notifications.
pub mod admin;
pub mod alert;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod delivery;
pub mod events;
pub mod herald;
pub mod labels;
pub mod metrics;
pub mod receiver;
pub mod render;
pub mod routing;
pub mod secret;
pub mod standalone;
pub mod store;
