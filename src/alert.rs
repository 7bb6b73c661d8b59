//! Incoming alert payloads (Alertmanager webhook v4 and API v2) and the one shape Herald
//! routes and delivers.

use serde::{Deserialize, Serialize};

use crate::object::ObjectKey;

/// Labels or annotations: sorted so that rendering and fingerprints are deterministic.
pub use crate::labels::LabelSet;

/// Whether an alert is firing or resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    /// The alert is active.
    #[default]
    Firing,
    /// The alert has ended.
    Resolved,
}

impl AlertStatus {
    /// The status as Alertmanager writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        }
    }
}

/// One alert, in the shape Herald routes and delivers (Alertmanager's webhook alert shape).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// Firing or resolved.
    #[serde(default)]
    pub status: AlertStatus,
    /// Identifying labels (alertname, severity, namespace, ...).
    #[serde(default, deserialize_with = "nullable_set")]
    pub labels: LabelSet,
    /// Descriptive annotations (summary, description, ...).
    #[serde(default, deserialize_with = "nullable_set")]
    pub annotations: LabelSet,
    /// RFC 3339 start time, as received; written as Go's zero time when unset.
    #[serde(default, serialize_with = "time_or_zero")]
    pub starts_at: String,
    /// RFC 3339 end time, as received; written as Go's zero time when unset (Alertmanager's
    /// webhook shows a firing alert's end that way).
    #[serde(default, serialize_with = "time_or_zero")]
    pub ends_at: String,
    /// Link back to the alert's source.
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    /// Alertmanager's fingerprint; computed from the labels when absent.
    #[serde(default)]
    pub fingerprint: String,
    /// What is derived from the alert once and shared by every delivery that carries it.
    #[serde(skip)]
    pub derived: Derived,
}

/// What is derived from an alert once, on first use, and shared by every delivery that carries
/// it (an alert matching ten webhooks is written once, not ten times): the alert as JSON, whole
/// and its labels and annotations alone (the common ones of a one-alert delivery); and one value
/// another part keeps with it (the renderer's texts), of which the alert knows nothing. Never
/// serialized or compared; a clone starts empty.
#[derive(Default)]
pub struct Derived {
    json: JsonCell,
    labels_json: JsonCell,
    annotations_json: JsonCell,
    kept: std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>,
}

impl Derived {
    /// The kept value of type `T`, made empty by the first call; `None` when a value of
    /// another type was made first (one part keeps its value here).
    pub fn get_or_default<T: std::any::Any + Send + Sync + Default>(&self) -> Option<&T> {
        self.kept.get_or_init(|| Box::<T>::default()).downcast_ref()
    }
}

impl Clone for Derived {
    fn clone(&self) -> Self {
        Derived::default()
    }
}

impl PartialEq for Derived {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Derived")
    }
}

impl Alert {
    /// The synthetic alert a test message carries.
    pub fn test(webhook: &ObjectKey, now: &str) -> Alert {
        let mut alert = Alert {
            status: AlertStatus::Firing,
            labels: LabelSet::from([
                ("alertname".to_string(), "HeraldTest".to_string()),
                ("severity".to_string(), "info".to_string()),
                ("namespace".to_string(), webhook.namespace.to_string()),
            ]),
            annotations: LabelSet::from([(
                "summary".to_string(),
                format!("Test message for webhook {webhook}"),
            )]),
            starts_at: now.to_string(),
            ..Alert::default()
        };
        alert.ensure_fingerprint();
        alert
    }

    /// The alert's name (`alertname` label), empty when absent.
    pub fn name(&self) -> &str {
        self.labels.get("alertname").unwrap_or("")
    }

    /// The alert as JSON, written once. Call only once the alert no longer changes (it is
    /// shared by its deliveries). `None` only if it cannot be written (strings and string maps
    /// always can).
    pub fn json(&self) -> Option<&serde_json::value::RawValue> {
        written_once(&self.derived.json, &AlertFromParts(self))
    }

    /// The alert's labels as JSON, written once (see [`Alert::json`]).
    pub fn labels_json(&self) -> Option<&serde_json::value::RawValue> {
        written_once(&self.derived.labels_json, &self.labels)
    }

    /// The alert's annotations as JSON, written once (see [`Alert::json`]).
    pub fn annotations_json(&self) -> Option<&serde_json::value::RawValue> {
        written_once(&self.derived.annotations_json, &self.annotations)
    }

    /// Fills in the fingerprint from the labels when the sender gave none.
    pub fn ensure_fingerprint(&mut self) {
        if self.fingerprint.is_empty() {
            self.fingerprint = fingerprint(&self.labels);
        }
    }
}

/// An alert as its kept JSON holds it, with its labels and annotations left as JSON text.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeptAlertParts<'a> {
    #[serde(default)]
    status: AlertStatus,
    #[serde(default, borrow)]
    labels: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    annotations: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    starts_at: String,
    #[serde(default)]
    ends_at: String,
    #[serde(default, rename = "generatorURL")]
    generator_url: String,
    #[serde(default)]
    fingerprint: String,
}

impl Alert {
    /// An alert read back from the JSON that [`Alert::json`] wrote (a delivery kept in a
    /// store): that JSON, and its labels' and annotations' parts, are kept with it as they were
    /// read, so that the renderer need not write them again.
    pub fn from_kept_json(raw: &serde_json::value::RawValue) -> Result<Alert, serde_json::Error> {
        let parts: KeptAlertParts<'_> = serde_json::from_str(raw.get())?;
        let labels = read_kept_set(parts.labels)?;
        let annotations = read_kept_set(parts.annotations)?;
        let alert = Alert {
            status: parts.status,
            labels: labels.0,
            annotations: annotations.0,
            starts_at: parts.starts_at,
            ends_at: parts.ends_at,
            generator_url: parts.generator_url,
            fingerprint: parts.fingerprint,
            derived: Derived::default(),
        };
        // The cells are empty: setting them cannot fail.
        let _ = alert.derived.json.set(Some(raw.to_owned()));
        if let Some(json) = labels.1 {
            let _ = alert.derived.labels_json.set(Some(json));
        }
        if let Some(json) = annotations.1 {
            let _ = alert.derived.annotations_json.set(Some(json));
        }
        Ok(alert)
    }
}

/// A label set read from kept JSON, with that JSON when it is the set written as
/// [`Alert::labels_json`] writes it (an object).
fn read_kept_set(
    raw: Option<&serde_json::value::RawValue>,
) -> Result<(LabelSet, Option<Box<serde_json::value::RawValue>>), serde_json::Error> {
    let Some(raw) = raw else {
        return Ok((LabelSet::default(), None));
    };
    let set: Option<LabelSet> = serde_json::from_str(raw.get())?;
    Ok(match set {
        Some(set) => (set, Some(raw.to_owned())),
        None => (LabelSet::default(), None),
    })
}

/// Alerts read back from a store, shared by every delivery read back that carries the same
/// alert while one of them is held (an alert matching ten webhooks is read, kept and rendered
/// once, not ten times). Alerts are found by their JSON text.
#[derive(Default)]
pub struct SharedKeptAlerts {
    seen: std::sync::Mutex<SeenAlerts>,
}

#[derive(Default)]
struct SeenAlerts {
    by_checksum: std::collections::HashMap<u32, std::sync::Weak<Alert>>,
    /// The size at which entries of alerts no longer held are dropped.
    sweep_at: usize,
}

impl SharedKeptAlerts {
    /// The alert that `raw` (JSON written by [`Alert::json`]) holds: one read back before and
    /// still held, or a new one.
    pub fn read(
        &self,
        raw: &serde_json::value::RawValue,
    ) -> Result<std::sync::Arc<Alert>, serde_json::Error> {
        let checksum = crc32fast::hash(raw.get().as_bytes());
        let held = self
            .seen()
            .by_checksum
            .get(&checksum)
            .and_then(std::sync::Weak::upgrade);
        if let Some(alert) = held
            && alert.json().map(|json| json.get()) == Some(raw.get())
        {
            return Ok(alert);
        }
        let alert = std::sync::Arc::new(Alert::from_kept_json(raw)?);
        let mut seen = self.seen();
        seen.by_checksum
            .insert(checksum, std::sync::Arc::downgrade(&alert));
        if seen.by_checksum.len() >= seen.sweep_at {
            seen.by_checksum.retain(|_, alert| alert.strong_count() > 0);
            seen.sweep_at = (seen.by_checksum.len() * 2).max(1024);
        }
        Ok(alert)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, SeenAlerts> {
        // Every critical section leaves the map whole.
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An alert written as its derived `Serialize` writes it, with its labels and annotations
/// copied from their own cached JSON (a one-alert body carries them again as its common ones).
struct AlertFromParts<'a>(&'a Alert);

impl Serialize for AlertFromParts<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let alert = self.0;
        let mut out = serializer.serialize_struct("Alert", 7)?;
        out.serialize_field("status", &alert.status)?;
        match alert.labels_json() {
            Some(json) => out.serialize_field("labels", json)?,
            None => out.serialize_field("labels", &alert.labels)?,
        }
        match alert.annotations_json() {
            Some(json) => out.serialize_field("annotations", json)?,
            None => out.serialize_field("annotations", &alert.annotations)?,
        }
        out.serialize_field("startsAt", time_or_zero_str(&alert.starts_at))?;
        out.serialize_field("endsAt", time_or_zero_str(&alert.ends_at))?;
        out.serialize_field("generatorURL", &alert.generator_url)?;
        out.serialize_field("fingerprint", &alert.fingerprint)?;
        out.end()
    }
}

/// A list of alerts written with each alert's JSON, written once and shared by every delivery
/// and body that carries the alert (see [`Alert::json`]).
pub struct CachedAlerts<'a>(pub &'a [std::sync::Arc<Alert>]);

impl Serialize for CachedAlerts<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq as _;
        let mut alerts = serializer.serialize_seq(Some(self.0.len()))?;
        for alert in self.0 {
            match alert.json() {
                Some(json) => alerts.serialize_element(json)?,
                None => alerts.serialize_element(alert.as_ref())?,
            }
        }
        alerts.end()
    }
}

/// Go's zero time as Alertmanager writes it: a time that is not set.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A time as Alertmanager's Go types read it: an unset one is Go's zero time, never "".
fn time_or_zero_str(time: &str) -> &str {
    if time.is_empty() { ZERO_TIME } else { time }
}

fn time_or_zero<S: serde::Serializer>(time: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(time_or_zero_str(time))
}

/// Reads a label set that may be `null` (Alertmanager's API v2 accepts
/// `"annotations": null`) as an empty one.
fn nullable_set<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<LabelSet, D::Error> {
    Ok(Option::<LabelSet>::deserialize(deserializer)?.unwrap_or_default())
}

/// A time that is set: `None` when missing, empty, or Go's zero time (which Alertmanager reads
/// as unset); `Err` when it is not an RFC 3339 time.
fn set_time(time: Option<&str>) -> Result<Option<k8s_openapi::jiff::Timestamp>, ()> {
    let Some(text) = time.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let parsed: k8s_openapi::jiff::Timestamp = text.parse().map_err(|_| ())?;
    // Go's zero time is year 1; nothing real happened before year 2.
    let unset = parsed.as_second() < -62_135_596_800 + 366 * 86_400;
    Ok((!unset).then_some(parsed))
}

/// Whether a time is unset (missing, empty or Go's zero time).
pub fn is_unset_time(time: &str) -> bool {
    matches!(set_time(Some(time)), Ok(None))
}

/// A cached JSON rendering: `value` written the first time, the same text afterwards.
fn written_once<'a, T: Serialize + ?Sized>(
    cell: &'a JsonCell,
    value: &T,
) -> Option<&'a serde_json::value::RawValue> {
    cell.get_or_init(|| serde_json::value::to_raw_value(value).ok())
        .as_deref()
}

/// Where a rendering's JSON is kept (`None` if it could not be written).
type JsonCell = std::sync::OnceLock<Option<Box<serde_json::value::RawValue>>>;

/// A stable 64-bit FNV-1a fingerprint of a label set, as 16 hex digits (Alertmanager's scheme).
pub fn fingerprint(labels: &LabelSet) -> String {
    use std::hash::Hasher;
    let mut hasher = fnv::FnvHasher::default();
    for (name, value) in labels {
        hasher.write(name.as_bytes());
        hasher.write(&[0xff]);
        hasher.write(value.as_bytes());
        hasher.write(&[0xff]);
    }
    format!("{:016x}", hasher.finish())
}

/// Alertmanager's `webhook_configs` payload (version 4): its `Message` and `template.Data`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerPayload {
    /// Payload version; Alertmanager sends "4".
    #[serde(default)]
    pub version: String,
    /// Alertmanager's key for the alert group.
    #[serde(default)]
    pub group_key: String,
    /// Number of alerts Alertmanager truncated from this payload.
    #[serde(default)]
    pub truncated_alerts: u64,
    /// Status of the group.
    #[serde(default)]
    pub status: AlertStatus,
    /// The Alertmanager receiver that sent it.
    #[serde(default)]
    pub receiver: String,
    /// Labels the group was formed by.
    #[serde(default, deserialize_with = "nullable_set")]
    pub group_labels: LabelSet,
    /// Labels every alert of the group shares.
    #[serde(default, deserialize_with = "nullable_set")]
    pub common_labels: LabelSet,
    /// Annotations every alert of the group shares.
    #[serde(default, deserialize_with = "nullable_set")]
    pub common_annotations: LabelSet,
    /// Alertmanager's own URL.
    #[serde(default, rename = "externalURL")]
    pub external_url: String,
    /// Why Alertmanager sent this notification (newer Alertmanagers).
    #[serde(default, rename = "notification_reason")]
    pub notification_reason: Option<String>,
    /// The labels of the route that sent it (newer Alertmanagers).
    #[serde(default)]
    pub route_labels: Option<LabelSet>,
    /// The alerts.
    pub alerts: Vec<Alert>,
}

/// What Alertmanager said about the group a batch came in, passed on unchanged by
/// `format: alertmanager`. Empty for alerts that did not come in a webhook payload.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupSource {
    /// The Alertmanager receiver that sent the batch.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub receiver: String,
    /// Alertmanager's key for the group.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_key: String,
    /// Alerts Alertmanager cut from the group (`max_alerts`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub truncated_alerts: u64,
    /// Why Alertmanager sent the notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_reason: Option<String>,
    /// The labels of the Alertmanager route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_labels: Option<LabelSet>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl GroupSource {
    /// Whether nothing is known about the group.
    pub fn is_empty(&self) -> bool {
        *self == GroupSource::default()
    }
}

/// One alert in Alertmanager's API v2 `POST /api/v2/alerts` shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    /// Identifying labels.
    #[serde(default, deserialize_with = "nullable_set")]
    pub labels: LabelSet,
    /// Descriptive annotations (`null` reads as none, as Alertmanager reads it).
    #[serde(default, deserialize_with = "nullable_set")]
    pub annotations: LabelSet,
    /// RFC 3339 start time.
    #[serde(default)]
    pub starts_at: Option<String>,
    /// RFC 3339 end time; an end in the past means resolved.
    #[serde(default)]
    pub ends_at: Option<String>,
    /// Link back to the alert's source.
    #[serde(default, rename = "generatorURL")]
    pub generator_url: Option<String>,
}

impl PostableAlert {
    /// Converts to Herald's alert shape the way Alertmanager's API v2 reads it: an unset time
    /// (missing or Go's zero time) is no time; an unset start is the end, or `now`; the alert is
    /// resolved only when its end is set and not after `now`. A firing alert's end is written
    /// as the zero time, as Alertmanager's webhook writes it. A time that cannot be read is
    /// kept as given (and the alert refused by [`AlertBatch::admit`]).
    pub fn into_alert(self, now: k8s_openapi::jiff::Timestamp) -> Alert {
        let start = set_time(self.starts_at.as_deref());
        let end = set_time(self.ends_at.as_deref());
        let resolved = matches!(end, Ok(Some(end)) if end <= now);
        let starts_at = match (start, end) {
            (Ok(Some(_)), _) | (Err(()), _) => self.starts_at.unwrap_or_default(),
            (Ok(None), Ok(Some(end))) => end.to_string(),
            (Ok(None), _) => now.to_string(),
        };
        let ends_at = match end {
            Err(()) => self.ends_at.unwrap_or_default(),
            Ok(_) if resolved => self.ends_at.unwrap_or_default(),
            Ok(_) => ZERO_TIME.to_string(),
        };
        let mut alert = Alert {
            status: if resolved {
                AlertStatus::Resolved
            } else {
                AlertStatus::Firing
            },
            labels: self.labels.without_empty_values(),
            annotations: self.annotations,
            starts_at,
            ends_at,
            generator_url: self.generator_url.unwrap_or_default(),
            fingerprint: String::new(),
            derived: Derived::default(),
        };
        alert.ensure_fingerprint();
        alert
    }
}

/// A batch of alerts as received in one request, with the group context to pass on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertBatch {
    /// The alerts.
    pub alerts: Vec<Alert>,
    /// Group labels from Alertmanager, when known.
    #[serde(default)]
    pub group_labels: LabelSet,
    /// Alertmanager's URL, when known.
    #[serde(default, rename = "externalURL")]
    pub external_url: String,
    /// The rest of what Alertmanager said about the group, when known.
    #[serde(default, skip_serializing_if = "GroupSource::is_empty")]
    pub source: GroupSource,
}

impl From<AlertmanagerPayload> for AlertBatch {
    fn from(payload: AlertmanagerPayload) -> Self {
        let mut alerts = payload.alerts;
        for alert in &mut alerts {
            // Alertmanager drops empty-valued labels before anything else looks at them.
            alert.labels = std::mem::take(&mut alert.labels).without_empty_values();
            // An unset time is Go's zero time, as Alertmanager's own types read it.
            for time in [&mut alert.starts_at, &mut alert.ends_at] {
                if time.is_empty() {
                    *time = ZERO_TIME.to_string();
                }
            }
            alert.ensure_fingerprint();
        }
        AlertBatch {
            alerts,
            group_labels: payload.group_labels,
            external_url: payload.external_url,
            source: GroupSource {
                receiver: payload.receiver,
                group_key: payload.group_key,
                truncated_alerts: payload.truncated_alerts,
                notification_reason: payload.notification_reason,
                route_labels: payload.route_labels,
            },
        }
    }
}

/// The request body limit by default (`--body-limit`): 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// Bounds on what one request may carry, beyond the body size.
#[derive(Clone, Copy, Debug)]
pub struct PayloadLimits {
    /// Alerts per request (more refuse the request).
    pub max_alerts: usize,
    /// Labels (and, separately, annotations) per alert (more refuse the alert).
    pub max_labels: usize,
    /// Bytes in one label name (more refuse the alert).
    pub max_name_bytes: usize,
    /// Bytes in one label or annotation value (more refuse the alert). By default the body
    /// limit: no value that fits in a request is refused for its size.
    pub max_value_bytes: usize,
}

impl Default for PayloadLimits {
    fn default() -> Self {
        PayloadLimits {
            max_alerts: 10_000,
            max_labels: 256,
            max_name_bytes: 1024,
            max_value_bytes: DEFAULT_BODY_LIMIT,
        }
    }
}

impl AlertBatch {
    /// Takes the alerts that can be taken, as Alertmanager's API v2 does ("a best effort to
    /// insert all alerts that are valid"): each alert without labels, with a time that is not
    /// RFC 3339 or an end before its start, or past a limit, is removed and named in the
    /// returned list (its path under `root`: `alerts` for a webhook payload, empty for an API
    /// v2 array); the others stay. Only more alerts than `max_alerts` refuses the whole batch.
    pub fn admit(
        &mut self,
        limits: &PayloadLimits,
        root: &str,
    ) -> Result<Vec<ParseError>, ParseError> {
        if self.alerts.len() > limits.max_alerts {
            return Err(ParseError {
                path: if root.is_empty() {
                    ".".into()
                } else {
                    root.to_string()
                },
                message: format!(
                    "{} alerts in one request; at most {} are accepted",
                    self.alerts.len(),
                    limits.max_alerts
                ),
            });
        }
        let mut refused = Vec::new();
        let mut index = 0;
        self.alerts.retain(|alert| {
            let at = index;
            index += 1;
            match validate(alert, limits) {
                Ok(()) => true,
                Err((field, message)) => {
                    refused.push(ParseError {
                        path: format!("{root}[{at}]{field}"),
                        message,
                    });
                    false
                }
            }
        });
        Ok(refused)
    }
}

/// Why one alert cannot be taken: the path below the alert and the reason. Herald's own limits
/// first, then what Alertmanager's `Alert.Validate` checks.
fn validate(alert: &Alert, limits: &PayloadLimits) -> Result<(), (String, String)> {
    for (field, set) in [
        ("labels", &alert.labels),
        ("annotations", &alert.annotations),
    ] {
        if set.len() > limits.max_labels {
            return Err((
                format!(".{field}"),
                format!(
                    "{} entries; at most {} are accepted",
                    set.len(),
                    limits.max_labels
                ),
            ));
        }
        for (name, value) in set {
            if name.len() > limits.max_name_bytes {
                return Err((
                    format!(".{field}"),
                    format!(
                        "a name of {} bytes; at most {} are accepted",
                        name.len(),
                        limits.max_name_bytes
                    ),
                ));
            }
            if value.len() > limits.max_value_bytes {
                return Err((
                    format!(".{field}.{name}"),
                    format!(
                        "a value of {} bytes; at most {} are accepted",
                        value.len(),
                        limits.max_value_bytes
                    ),
                ));
            }
        }
    }
    let start = set_time(Some(&alert.starts_at))
        .map_err(|()| (".startsAt".to_string(), "not an RFC 3339 time".to_string()))?;
    let end = set_time(Some(&alert.ends_at))
        .map_err(|()| (".endsAt".to_string(), "not an RFC 3339 time".to_string()))?;
    if let (Some(start), Some(end)) = (start, end)
        && end < start
    {
        return Err((
            ".endsAt".into(),
            "start time must be before end time".into(),
        ));
    }
    if alert.labels.is_empty() {
        return Err((".labels".into(), "at least one label pair required".into()));
    }
    Ok(())
}

/// Why a payload could not be parsed: the message and the JSON path where it failed.
#[derive(Debug, thiserror::Error)]
#[error("invalid payload at {path}: {message}")]
pub struct ParseError {
    /// JSON path of the offending value (`.` for the document itself).
    pub path: String,
    /// What was wrong.
    pub message: String,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ParseError> {
    // A valid document is read once, without tracking paths; only a refused one is read again
    // to find where it went wrong.
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        ParseError {
            path: if path.is_empty() { ".".into() } else { path },
            message: err.into_inner().to_string(),
        }
    })?;
    // Anything but white space after the document is an error, not something to ignore.
    de.end().map_err(|err| ParseError {
        path: ".".into(),
        message: err.to_string(),
    })?;
    Ok(value)
}

/// Parses an Alertmanager webhook payload (`POST /api/v1/alerts`). An API v2 alert array is
/// refused with a pointer to `/api/v2/alerts`.
pub fn parse_alertmanager(body: &[u8]) -> Result<AlertBatch, ParseError> {
    if first_byte(body) == Some(b'[') {
        return Err(ParseError {
            path: ".".into(),
            message: "this is an API v2 alert array; POST it to /api/v2/alerts \
                      (/api/v1/alerts takes Alertmanager's webhook payload, an object)"
                .into(),
        });
    }
    let payload: AlertmanagerPayload = parse_json(body)?;
    Ok(payload.into())
}

/// Parses an API v2 alert array (`POST /api/v2/alerts`). A webhook payload is refused with a
/// pointer to `/api/v1/alerts`.
pub fn parse_v2(body: &[u8], now: k8s_openapi::jiff::Timestamp) -> Result<AlertBatch, ParseError> {
    if first_byte(body) == Some(b'{') {
        return Err(ParseError {
            path: ".".into(),
            message: "this is an Alertmanager webhook payload; POST it to /api/v1/alerts \
                      (/api/v2/alerts takes an array of alerts)"
                .into(),
        });
    }
    let alerts: Vec<PostableAlert> = parse_json(body)?;
    Ok(AlertBatch {
        alerts: alerts.into_iter().map(|a| a.into_alert(now)).collect(),
        ..AlertBatch::default()
    })
}

/// The first byte of a document that is not white space.
fn first_byte(body: &[u8]) -> Option<u8> {
    body.iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// Parses either shape: an object is an Alertmanager payload, an array is API v2.
pub fn parse_any(body: &[u8], now: k8s_openapi::jiff::Timestamp) -> Result<AlertBatch, ParseError> {
    match first_byte(body) {
        Some(b'[') => parse_v2(body, now),
        _ => parse_alertmanager(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_values_are_kept_once_and_never_cloned() {
        let alert = Alert::test(&ObjectKey::new("ns", "wh"), "2026-11-25T10:00:00Z");
        let first: &std::sync::OnceLock<String> = alert.derived.get_or_default().expect("kept");
        first.get_or_init(|| "made once".to_string());
        let again: &std::sync::OnceLock<String> = alert.derived.get_or_default().expect("kept");
        assert_eq!(again.get().map(String::as_str), Some("made once"));
        // One kind of value per alert: another type finds the place taken.
        assert!(alert.derived.get_or_default::<Vec<u8>>().is_none());
        // A clone starts empty and still compares equal.
        let copy = alert.clone();
        let fresh: &std::sync::OnceLock<String> = copy.derived.get_or_default().expect("kept");
        assert!(fresh.get().is_none());
        assert_eq!(copy, alert);
    }

    #[test]
    fn alertmanager_payload_parses_and_gets_fingerprints() {
        let body = br#"{"version":"4","status":"firing","receiver":"herald",
            "groupLabels":{"alertname":"X"},"commonLabels":{},"commonAnnotations":{},
            "externalURL":"http://am","alerts":[{"status":"resolved","labels":{"alertname":"X"},
            "annotations":{},"startsAt":"2026-01-01T00:00:00Z","endsAt":"2026-01-01T01:00:00Z",
            "generatorURL":"http://prom","fingerprint":""}]}"#;
        let batch = parse_alertmanager(body).expect("valid payload");
        assert_eq!(batch.alerts.len(), 1);
        assert_eq!(batch.alerts[0].status, AlertStatus::Resolved);
        assert_eq!(batch.alerts[0].fingerprint.len(), 16);
        assert_eq!(batch.external_url, "http://am");
    }

    #[test]
    fn parse_error_names_the_json_path() {
        let body = br#"{"alerts":[{"labels":{"alertname":5}}]}"#;
        let err = parse_alertmanager(body).expect_err("label values are strings");
        assert_eq!(err.path, "alerts[0].labels.alertname");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let err = parse_alertmanager(br#"{"alerts": []} trailing"#).expect_err("trailing");
        assert!(
            err.message.contains("trailing characters"),
            "{}",
            err.message
        );
        assert!(parse_alertmanager(b"{\"alerts\": []}\n  ").is_ok());
    }

    #[test]
    fn v2_end_in_the_past_is_resolved() {
        let now: k8s_openapi::jiff::Timestamp = "2026-06-01T00:00:00Z".parse().expect("time");
        let body = br#"[{"labels":{"alertname":"A"},"endsAt":"2026-01-01T00:00:00Z"},
                        {"labels":{"alertname":"B"},"endsAt":"2027-01-01T00:00:00Z"},
                        {"labels":{"alertname":"C"}}]"#;
        let batch = parse_v2(body, now).expect("valid");
        let statuses: Vec<_> = batch.alerts.iter().map(|a| a.status).collect();
        assert_eq!(
            statuses,
            [
                AlertStatus::Resolved,
                AlertStatus::Firing,
                AlertStatus::Firing
            ]
        );
    }

    #[test]
    fn limits_refuse_the_offending_alert_and_name_its_path() {
        let body = br#"{"alerts":[{"labels":{"a":"1"}},{"labels":{"b":"xxxxxxxxxx"}}]}"#;
        let limits = PayloadLimits {
            max_value_bytes: 5,
            ..PayloadLimits::default()
        };
        let mut batch = parse_alertmanager(body).expect("valid");
        let refused = batch.admit(&limits, "alerts").expect("per alert");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].path, "alerts[1].labels.b");
        assert_eq!(batch.alerts.len(), 1, "the other alert is taken");
        assert_eq!(batch.alerts[0].labels.get("a"), Some("1"));
        let mut batch = parse_alertmanager(body).expect("valid");
        assert_eq!(
            batch.admit(&limits, "").expect("per alert")[0].path,
            "[1].labels.b"
        );
        let mut batch = parse_alertmanager(body).expect("valid");
        assert!(
            batch
                .admit(&PayloadLimits::default(), "alerts")
                .expect("taken")
                .is_empty()
        );
        let too_many = PayloadLimits {
            max_alerts: 1,
            ..PayloadLimits::default()
        };
        assert_eq!(
            batch.admit(&too_many, "alerts").expect_err("whole").path,
            "alerts"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let depth = 100_000;
        let body = format!("{{\"alerts\": {}{}}}", "[".repeat(depth), "]".repeat(depth));
        assert!(parse_alertmanager(body.as_bytes()).is_err());
    }

    #[test]
    fn fingerprint_depends_on_every_label() {
        let a = LabelSet::from([("a".into(), "1".into())]);
        let b = LabelSet::from([("a".into(), "2".into())]);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    }
}
