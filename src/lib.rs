//! Herald: a Kubernetes operator that turns Alertmanager alerts and cluster events into
//! webhook notifications.
pub mod alert;
pub mod crd;
pub mod routing;
