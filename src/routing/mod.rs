//! The routing table: which webhooks an alert or event reaches, and why not the others.
//!
//! Pure and synchronous: sources (the Kubernetes controller, the standalone loader) feed it
//! plain inputs through `apply_*`/`delete_*`, and the receiver reads it through [`Table::resolve`].

mod selector;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

// Looked up on every resolve: foldhash rather than SipHash, still randomly seeded.
use foldhash::{HashMap, HashSet};

use crate::alert::{Alert, AlertStatus, LabelSet};
use crate::crd::{
    LabelOperator, LabelRequirement, NotificationConditionSpec, WebhookSpec, WebhookType,
};
use crate::object::{NotReady, NotReadyReason, ObjectKey};

pub use selector::selector_matches;

/// A resource's labels, sorted by key, in one allocation: the table keeps them for every webhook
/// (for `webhookSelector`), where a `BTreeMap` would take half a kilobyte for a single label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(Box<[(String, String)]>);

impl Labels {
    /// The value of a label.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    /// The labels, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(labels: BTreeMap<String, String>) -> Self {
        // A BTreeMap iterates in key order: the slice is sorted.
        Labels(labels.into_iter().collect())
    }
}

/// The parts of a Webhook's spec that decide what reaches it: the table keeps these and
/// nothing else (URLs, credentials and formats belong to delivery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// Alarms or Events.
    pub kind: WebhookType,
    /// `spec.enabled`.
    pub enabled: bool,
    /// `spec.eventTypes`.
    pub event_types: Vec<String>,
    /// `spec.conditions`, by name.
    pub conditions: Vec<String>,
    /// `spec.sendResolved`.
    pub send_resolved: bool,
}

impl From<WebhookSpec> for RouteSpec {
    fn from(mut spec: WebhookSpec) -> Self {
        // Kept for as long as the webhook exists: without the spare capacity decoding left.
        spec.event_types.shrink_to_fit();
        spec.conditions.shrink_to_fit();
        RouteSpec {
            kind: spec.kind,
            enabled: spec.enabled,
            event_types: spec.event_types,
            conditions: spec.conditions,
            send_resolved: spec.send_resolved,
        }
    }
}

impl From<&WebhookSpec> for RouteSpec {
    fn from(spec: &WebhookSpec) -> Self {
        RouteSpec {
            kind: spec.kind,
            enabled: spec.enabled,
            event_types: spec.event_types.clone(),
            conditions: spec.conditions.clone(),
            send_resolved: spec.send_resolved,
        }
    }
}

/// A webhook as the table sees it: what routes to it, its labels (for `webhookSelector`) and
/// whether its credentials and TLS material resolved.
#[derive(Clone, Debug)]
pub struct WebhookInput {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `metadata.labels`.
    pub labels: Labels,
    /// The routing part of the spec.
    pub spec: RouteSpec,
    /// `Err` when Secrets or TLS material could not be resolved.
    pub credentials: Result<(), NotReady>,
}

/// A NotificationCondition as the table sees it.
#[derive(Clone, Debug)]
pub struct ConditionInput {
    /// Namespace and name.
    pub key: ObjectKey,
    /// The spec.
    pub spec: NotificationConditionSpec,
}

/// Why a webhook does not get an alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The webhook is disabled.
    Disabled,
    /// The webhook cannot deliver (Secrets, TLS material, missing condition).
    NotReady(NotReady),
    /// The webhook takes the other type (Alarms or Events).
    WrongType(WebhookType),
    /// `eventTypes` does not list this alert name or event reason.
    EventTypeNotWanted(String),
    /// The alert is resolved and the webhook has `sendResolved: false`.
    ResolvedNotWanted,
    /// The webhook's namespace is not a cluster namespace and the alert belongs elsewhere.
    Tenancy {
        /// The alert's `namespace` label, if any.
        alert_namespace: Option<String>,
    },
    /// A condition does not hold.
    ConditionFailed {
        /// The condition's name.
        condition: String,
        /// The label that failed.
        label: String,
        /// The requirement's operator.
        operator: LabelOperator,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Disabled => f.write_str("disabled"),
            Rejection::NotReady(not_ready) => write!(f, "not ready ({not_ready})"),
            Rejection::WrongType(kind) => write!(f, "takes {kind:?}"),
            Rejection::EventTypeNotWanted(t) => write!(f, "event type {t:?} not in eventTypes"),
            Rejection::ResolvedNotWanted => f.write_str("resolved alert and sendResolved is false"),
            Rejection::Tenancy { alert_namespace } => match alert_namespace {
                Some(ns) => write!(f, "tenancy: alert belongs to namespace {ns:?}"),
                None => f.write_str("tenancy: alert has no namespace label"),
            },
            Rejection::ConditionFailed {
                condition,
                label,
                operator,
            } => write!(
                f,
                "condition {condition} failed on label {label} ({operator:?})"
            ),
        }
    }
}

/// The verdict for one webhook: delivered, or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The webhook.
    pub webhook: ObjectKey,
    /// `Ok` when the webhook gets the alert.
    pub outcome: Result<(), Rejection>,
}

#[derive(Debug)]
struct WebhookEntry {
    input: WebhookInput,
    event_types: BTreeSet<String>,
}

/// Something routed: an alert, or a Kubernetes Event in alert shape.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// Alarms for alerts, Events for Kubernetes Events.
    pub kind: WebhookType,
    /// The labels conditions are evaluated on.
    pub labels: &'a LabelSet,
    /// Firing or resolved.
    pub status: AlertStatus,
}

impl<'a> Subject<'a> {
    /// An Alertmanager alert.
    pub fn alert(alert: &'a Alert) -> Self {
        Subject {
            kind: WebhookType::Alarms,
            labels: &alert.labels,
            status: alert.status,
        }
    }

    /// A Kubernetes Event mapped to alert shape (labels reason, type, namespace, kind, name).
    pub fn event(alert: &'a Alert) -> Self {
        Subject {
            kind: WebhookType::Events,
            labels: &alert.labels,
            status: alert.status,
        }
    }

    fn event_type(&self) -> &'a str {
        let label = match self.kind {
            WebhookType::Alarms => "alertname",
            WebhookType::Events => "reason",
        };
        self.labels.get(label).unwrap_or("")
    }

    fn namespace(&self) -> Option<&'a str> {
        self.labels.get("namespace")
    }
}

/// The webhooks of one type in one namespace, each indexed once: by the event types it lists,
/// else by the first NotificationCondition it names, else among those that want everything.
#[derive(Debug, Default)]
struct NamespaceIndex {
    /// Webhooks with empty `eventTypes` and no named condition.
    any: HashSet<ObjectKey>,
    /// Webhooks by each event type they list.
    by_event_type: HashMap<String, WebhookKeys>,
    /// Webhooks with empty `eventTypes`, by the first condition they name: every condition must
    /// hold, so a subject that fails this one cannot reach them.
    by_condition: HashMap<String, WebhookKeys>,
}

/// The webhooks indexed under one event type or condition: most often a single one, kept without
/// a set of its own (a hash set's smallest table has room for four keys; a B-tree node takes
/// half a kilobyte).
#[derive(Debug)]
enum WebhookKeys {
    One(ObjectKey),
    Many(HashSet<ObjectKey>),
}

impl WebhookKeys {
    fn insert(&mut self, key: &ObjectKey) {
        match self {
            WebhookKeys::One(one) if one == key => {}
            WebhookKeys::One(one) => {
                *self = WebhookKeys::Many([one.clone(), key.clone()].into_iter().collect());
            }
            WebhookKeys::Many(set) => {
                set.insert(key.clone());
            }
        }
    }

    /// Removes a key; whether none is left.
    fn remove(&mut self, key: &ObjectKey) -> bool {
        match self {
            WebhookKeys::One(one) => one == key,
            WebhookKeys::Many(set) => {
                set.remove(key);
                set.is_empty()
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = &ObjectKey> {
        let (one, many) = match self {
            WebhookKeys::One(key) => (Some(key), None),
            WebhookKeys::Many(set) => (None, Some(set)),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// Adds a webhook to the entry of `name`.
fn insert_key(map: &mut HashMap<String, WebhookKeys>, name: &str, key: &ObjectKey) {
    match map.get_mut(name) {
        Some(keys) => keys.insert(key),
        None => {
            map.insert(name.to_string(), WebhookKeys::One(key.clone()));
        }
    }
}

/// Takes a webhook out of the entry of `name`, dropping the entry when it empties.
fn remove_key(map: &mut HashMap<String, WebhookKeys>, name: &str, key: &ObjectKey) {
    remove_from_entry(map, name, |keys| keys.remove(key));
}

/// Which part of its [`NamespaceIndex`] a webhook is indexed in.
fn indexed_by(spec: &RouteSpec) -> IndexedBy<'_> {
    if !spec.event_types.is_empty() {
        IndexedBy::EventTypes
    } else if let Some(first) = spec.conditions.first() {
        IndexedBy::Condition(first)
    } else {
        IndexedBy::Any
    }
}

enum IndexedBy<'a> {
    /// Among the webhooks that want everything.
    Any,
    /// Under each event type it lists.
    EventTypes,
    /// Under the first condition it names.
    Condition(&'a str),
}

impl NamespaceIndex {
    fn insert(&mut self, key: &ObjectKey, spec: &RouteSpec, event_types: &BTreeSet<String>) {
        match indexed_by(spec) {
            IndexedBy::Any => {
                self.any.insert(key.clone());
            }
            IndexedBy::EventTypes => {
                for t in event_types {
                    insert_key(&mut self.by_event_type, t, key);
                }
            }
            IndexedBy::Condition(name) => insert_key(&mut self.by_condition, name, key),
        }
    }

    fn remove(&mut self, key: &ObjectKey, spec: &RouteSpec, event_types: &BTreeSet<String>) {
        match indexed_by(spec) {
            IndexedBy::Any => {
                self.any.remove(key);
            }
            IndexedBy::EventTypes => {
                for t in event_types {
                    remove_key(&mut self.by_event_type, t, key);
                }
            }
            IndexedBy::Condition(name) => remove_key(&mut self.by_condition, name, key),
        }
    }

    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.by_event_type.is_empty() && self.by_condition.is_empty()
    }
}

fn remove_from_set<T: Eq + std::hash::Hash>(
    map: &mut HashMap<String, HashSet<T>>,
    name: &str,
    item: &T,
) {
    remove_from_entry(map, name, |set| {
        set.remove(item);
        set.is_empty()
    });
}

/// The NotificationConditions of one namespace, by one `In` requirement each: a subject can
/// only satisfy a condition whose anchor label carries one of the anchor values, so resolve
/// looks up the subject's labels instead of testing every condition.
#[derive(Debug, Default)]
struct ConditionIndex {
    /// Condition names by anchor label, then anchor value.
    anchored: HashMap<String, HashMap<String, HashSet<String>>>,
    /// Conditions without an `In` requirement: candidates for every subject.
    unanchored: HashSet<String>,
}

/// The `In` requirement a condition is indexed by: the one with the fewest values.
fn anchor(spec: &NotificationConditionSpec) -> Option<&LabelRequirement> {
    spec.match_expressions
        .iter()
        .filter(|req| req.operator == LabelOperator::In && !req.values.is_empty())
        .min_by_key(|req| req.values.len())
}

impl ConditionIndex {
    fn insert(&mut self, name: &str, spec: &NotificationConditionSpec) {
        match anchor(spec) {
            None => {
                self.unanchored.insert(name.to_string());
            }
            Some(req) => {
                let by_value = self.anchored.entry(req.key.clone()).or_default();
                for value in &req.values {
                    by_value
                        .entry(value.clone())
                        .or_default()
                        .insert(name.to_string());
                }
            }
        }
    }

    fn remove(&mut self, name: &str, spec: &NotificationConditionSpec) {
        match anchor(spec) {
            None => {
                self.unanchored.remove(name);
            }
            Some(req) => {
                remove_from_entry(&mut self.anchored, &req.key, |by_value| {
                    for value in &req.values {
                        remove_from_set(by_value, value, &name.to_string());
                    }
                    by_value.is_empty()
                });
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.anchored.is_empty() && self.unanchored.is_empty()
    }

    /// Calls `visit` once for each condition the labels may satisfy.
    fn candidates<'a>(&'a self, labels: &'a LabelSet, mut visit: impl FnMut(&'a str)) {
        let mut anchored = |label: &str, value: &str| {
            if let Some(names) = self.anchored.get(label).and_then(|v| v.get(value)) {
                names.iter().for_each(|n| visit(n));
            }
        };
        // Walk the smaller side: the anchor labels in use, or the subject's labels.
        if self.anchored.len() <= labels.len() {
            for label in self.anchored.keys() {
                if let Some(value) = labels.get(label) {
                    anchored(label, value);
                }
            }
        } else {
            for (label, value) in labels {
                anchored(label, value);
            }
        }
        self.unanchored.iter().for_each(|n| visit(n));
    }
}

/// The routing table.
#[derive(Debug, Default)]
pub struct Table {
    cluster_namespaces: BTreeSet<String>,
    /// Boxed: a spec is large, and the map's spare capacity should not hold its size.
    webhooks: HashMap<ObjectKey, Box<WebhookEntry>>,
    /// Webhook keys by type, namespace and event type: resolve looks only at the webhooks that
    /// can want the subject.
    index: HashMap<WebhookType, HashMap<String, NamespaceIndex>>,
    /// Conditions by namespace, then name (hashed: resolve looks names up for every candidate).
    conditions: HashMap<String, HashMap<String, Arc<NotificationConditionSpec>>>,
    /// The subset of `conditions` that have a `webhookSelector`.
    selector_conditions: HashMap<String, BTreeMap<String, Arc<NotificationConditionSpec>>>,
    /// `conditions` by namespace, indexed by an `In` requirement each.
    condition_index: HashMap<String, ConditionIndex>,
}

impl Table {
    /// An empty table whose cluster namespaces (see Tenancy) are the ones given.
    pub fn new(cluster_namespaces: impl IntoIterator<Item = String>) -> Self {
        Table {
            cluster_namespaces: cluster_namespaces.into_iter().collect(),
            ..Table::default()
        }
    }

    /// The namespaces whose webhooks may receive any alert.
    pub fn cluster_namespaces(&self) -> &BTreeSet<String> {
        &self.cluster_namespaces
    }

    /// Adds or replaces a webhook.
    pub fn apply_webhook(&mut self, input: WebhookInput) {
        self.delete_webhook(&input.key);
        let event_types: BTreeSet<String> = input.spec.event_types.iter().cloned().collect();
        self.index
            .entry(input.spec.kind)
            .or_default()
            .entry(input.key.namespace.to_string())
            .or_default()
            .insert(&input.key, &input.spec, &event_types);
        self.webhooks.insert(
            input.key.clone(),
            Box::new(WebhookEntry { input, event_types }),
        );
    }

    /// Removes a webhook; removing an unknown one is a no-op.
    pub fn delete_webhook(&mut self, key: &ObjectKey) {
        let Some(old) = self.webhooks.remove(key) else {
            return;
        };
        if let Some(namespaces) = self.index.get_mut(&old.input.spec.kind) {
            remove_from_entry(namespaces, &key.namespace, |index| {
                index.remove(key, &old.input.spec, &old.event_types);
                index.is_empty()
            });
        }
    }

    /// Adds or replaces a condition.
    pub fn apply_condition(&mut self, mut input: ConditionInput) {
        // Kept for as long as the condition exists: without the spare capacity decoding left.
        input.spec.match_expressions.shrink_to_fit();
        for req in &mut input.spec.match_expressions {
            req.values.shrink_to_fit();
        }
        self.unindex_condition(&input.key);
        self.condition_index
            .entry(input.key.namespace.to_string())
            .or_default()
            .insert(&input.key.name, &input.spec);
        let spec = Arc::new(input.spec);
        let with_selector = self
            .selector_conditions
            .entry(input.key.namespace.to_string())
            .or_default();
        if spec.webhook_selector.is_some() {
            with_selector.insert(input.key.name.to_string(), spec.clone());
        } else {
            with_selector.remove(&*input.key.name);
        }
        self.conditions
            .entry(input.key.namespace.to_string())
            .or_default()
            .insert(input.key.name.to_string(), spec);
    }

    /// Removes a condition; webhooks naming it stop delivering (fail closed).
    pub fn delete_condition(&mut self, key: &ObjectKey) {
        self.unindex_condition(key);
        let name: &str = &key.name;
        remove_from_entry(&mut self.conditions, &key.namespace, |names| {
            names.remove(name);
            names.is_empty()
        });
        remove_from_entry(&mut self.selector_conditions, &key.namespace, |names| {
            names.remove(name);
            names.is_empty()
        });
    }

    fn unindex_condition(&mut self, key: &ObjectKey) {
        let Some(old) = self
            .conditions
            .get(&*key.namespace)
            .and_then(|names| names.get(&*key.name))
        else {
            return;
        };
        remove_from_entry(&mut self.condition_index, &key.namespace, |index| {
            index.remove(&key.name, old);
            index.is_empty()
        });
    }

    /// Number of webhooks in the table.
    pub fn len(&self) -> usize {
        self.webhooks.len()
    }

    /// Whether the table holds no webhook.
    pub fn is_empty(&self) -> bool {
        self.webhooks.is_empty()
    }

    /// The webhook input for a key.
    pub fn webhook(&self, key: &ObjectKey) -> Option<&WebhookInput> {
        self.webhooks.get(key).map(|e| &e.input)
    }

    /// Every webhook, in no particular order.
    pub fn webhooks(&self) -> impl Iterator<Item = &WebhookInput> {
        self.webhooks.values().map(|e| &e.input)
    }

    /// Every condition's key, in no particular order.
    pub fn condition_keys(&self) -> impl Iterator<Item = ObjectKey> + '_ {
        self.conditions.iter().flat_map(|(ns, names)| {
            names
                .keys()
                .map(move |name| ObjectKey::new(ns.as_str(), name.as_str()))
        })
    }

    /// Every webhook key, sorted.
    pub fn webhook_keys(&self) -> Vec<ObjectKey> {
        let mut keys: Vec<_> = self.webhooks.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Whether a webhook can deliver: `Ok`, or the reason for `Ready=False`.
    pub fn readiness(&self, key: &ObjectKey) -> Option<Result<(), NotReady>> {
        let entry = self.webhooks.get(key)?;
        Some(self.entry_readiness(entry))
    }

    /// Names of the conditions that apply to a webhook: those it lists and those whose
    /// `webhookSelector` matches it.
    pub fn conditions_of(&self, key: &ObjectKey) -> Vec<String> {
        let Some(entry) = self.webhooks.get(key) else {
            return Vec::new();
        };
        let mut names: BTreeSet<String> = entry.input.spec.conditions.iter().cloned().collect();
        if let Some(in_ns) = self.selector_conditions.get(&*key.namespace) {
            for (name, spec) in in_ns {
                if spec
                    .webhook_selector
                    .as_ref()
                    .is_some_and(|s| selector_matches(s, &entry.input.labels))
                {
                    names.insert(name.clone());
                }
            }
        }
        names.into_iter().collect()
    }

    fn entry_readiness(&self, entry: &WebhookEntry) -> Result<(), NotReady> {
        if !entry.input.spec.enabled {
            return Err(NotReady::new(
                NotReadyReason::Disabled,
                "spec.enabled is false",
            ));
        }
        self.unready(entry).map_err(Unready::into_not_ready)
    }

    /// What keeps an enabled webhook from delivering: unresolved credentials, or a named
    /// condition that does not exist (fail closed). Borrows, so resolve never allocates.
    fn unready<'a>(&'a self, entry: &'a WebhookEntry) -> Result<(), Unready<'a>> {
        self.unready_in(entry, self.conditions.get(&*entry.input.key.namespace))
    }

    /// [`Table::unready`], given the conditions of the webhook's namespace.
    fn unready_in<'a>(
        &'a self,
        entry: &'a WebhookEntry,
        in_ns: Option<&'a HashMap<String, Arc<NotificationConditionSpec>>>,
    ) -> Result<(), Unready<'a>> {
        if let Err(not_ready) = &entry.input.credentials {
            return Err(Unready::Credentials(not_ready));
        }
        match entry
            .input
            .spec
            .conditions
            .iter()
            .find(|name| !in_ns.is_some_and(|c| c.contains_key(name.as_str())))
        {
            Some(missing) => Err(Unready::ConditionNotFound { entry, missing }),
            None => Ok(()),
        }
    }

    /// The webhooks that get this subject, sorted by key.
    pub fn resolve(&self, subject: Subject<'_>) -> Vec<ObjectKey> {
        let mut matched = Vec::new();
        self.resolve_each(subject, |key| matched.push(key.clone()));
        matched.sort();
        matched
    }

    /// Calls `deliver` once for each webhook that gets this subject, in no particular order,
    /// without allocating: the receiver's path.
    pub fn resolve_each<'a>(
        &'a self,
        subject: Subject<'_>,
        mut deliver: impl FnMut(&'a ObjectKey),
    ) {
        let Some(namespaces) = self.index.get(&subject.kind) else {
            return;
        };
        let mut consider = |key: &'a ObjectKey| {
            if let Some(entry) = self.webhooks.get(key)
                && self.check(entry, subject).is_ok()
            {
                deliver(key);
            }
        };
        let mut visit = |namespace: &str| {
            let Some(index) = namespaces.get(namespace) else {
                return;
            };
            index.any.iter().for_each(&mut consider);
            if let Some(keys) = index.by_event_type.get(subject.event_type()) {
                keys.iter().for_each(&mut consider);
            }
            if !index.by_condition.is_empty()
                && let Some(conditions) = self.condition_index.get(namespace)
            {
                // Webhooks indexed under a condition that does not exist are not ready: skipped.
                conditions.candidates(subject.labels, |name| {
                    if let Some(keys) = index.by_condition.get(name) {
                        keys.iter().for_each(&mut consider);
                    }
                });
            }
        };
        for ns in &self.cluster_namespaces {
            visit(ns);
        }
        if let Some(ns) = subject.namespace()
            && !self.cluster_namespaces.contains(ns)
        {
            visit(ns);
        }
    }

    /// The verdict for every webhook, sorted by key: who gets the subject and why the others don't.
    pub fn explain(&self, subject: Subject<'_>) -> Vec<Verdict> {
        let mut verdicts: Vec<Verdict> = self
            .webhooks
            .values()
            .map(|entry| Verdict {
                webhook: entry.input.key.clone(),
                outcome: self.check(entry, subject).map_err(Rejected::into_rejection),
            })
            .collect();
        verdicts.sort_by(|a, b| a.webhook.cmp(&b.webhook));
        verdicts
    }

    /// Whether a webhook gets a subject; the rejection borrows, so resolve never allocates.
    fn check<'a>(
        &'a self,
        entry: &'a WebhookEntry,
        subject: Subject<'a>,
    ) -> Result<(), Rejected<'a>> {
        let spec = &entry.input.spec;
        if !spec.enabled {
            return Err(Rejected::Owned(Rejection::Disabled));
        }
        if spec.kind != subject.kind {
            return Err(Rejected::Owned(Rejection::WrongType(spec.kind)));
        }
        let namespace: &str = &entry.input.key.namespace;
        let in_ns = self.conditions.get(namespace);
        self.unready_in(entry, in_ns).map_err(Rejected::NotReady)?;
        if !self.cluster_namespaces.contains(namespace) && subject.namespace() != Some(namespace) {
            return Err(Rejected::Tenancy(subject.namespace()));
        }
        if !entry.event_types.is_empty() && !entry.event_types.contains(subject.event_type()) {
            return Err(Rejected::EventTypeNotWanted(subject.event_type()));
        }
        if subject.status == AlertStatus::Resolved && !spec.send_resolved {
            return Err(Rejected::Owned(Rejection::ResolvedNotWanted));
        }
        // Named conditions: each exists (checked above).
        for name in &spec.conditions {
            if let Some(condition) = in_ns.and_then(|c| c.get(name)) {
                check_condition(name, condition, subject.labels)?;
            }
        }
        if let Some(with_selector) = self.selector_conditions.get(namespace) {
            for (name, condition) in with_selector {
                let selected = condition
                    .webhook_selector
                    .as_ref()
                    .is_some_and(|s| selector_matches(s, &entry.input.labels));
                if selected && !spec.conditions.contains(name) {
                    check_condition(name, condition, subject.labels)?;
                }
            }
        }
        Ok(())
    }
}

/// A [`Rejection`] that borrows from the table and the subject until someone wants to keep it.
enum Rejected<'a> {
    Owned(Rejection),
    NotReady(Unready<'a>),
    Tenancy(Option<&'a str>),
    EventTypeNotWanted(&'a str),
    ConditionFailed {
        condition: &'a str,
        requirement: &'a LabelRequirement,
    },
}

impl Rejected<'_> {
    fn into_rejection(self) -> Rejection {
        match self {
            Rejected::Owned(rejection) => rejection,
            Rejected::NotReady(unready) => Rejection::NotReady(unready.into_not_ready()),
            Rejected::Tenancy(alert_namespace) => Rejection::Tenancy {
                alert_namespace: alert_namespace.map(str::to_string),
            },
            Rejected::EventTypeNotWanted(t) => Rejection::EventTypeNotWanted(t.to_string()),
            Rejected::ConditionFailed {
                condition,
                requirement,
            } => Rejection::ConditionFailed {
                condition: condition.to_string(),
                label: requirement.key.clone(),
                operator: requirement.operator,
            },
        }
    }
}

/// Why an enabled webhook cannot deliver, borrowed until someone wants to keep it.
enum Unready<'a> {
    Credentials(&'a NotReady),
    ConditionNotFound {
        entry: &'a WebhookEntry,
        missing: &'a str,
    },
}

impl Unready<'_> {
    fn into_not_ready(self) -> NotReady {
        match self {
            Unready::Credentials(not_ready) => not_ready.clone(),
            Unready::ConditionNotFound { entry, missing } => NotReady::new(
                NotReadyReason::ConditionNotFound,
                format!(
                    "NotificationCondition {missing:?} not found in namespace {:?}; nothing is delivered until it exists",
                    entry.input.key.namespace
                ),
            ),
        }
    }
}

fn check_condition<'a>(
    name: &'a str,
    condition: &'a NotificationConditionSpec,
    labels: &LabelSet,
) -> Result<(), Rejected<'a>> {
    match condition
        .match_expressions
        .iter()
        .find(|req| !requirement_holds(req, labels))
    {
        None => Ok(()),
        Some(requirement) => Err(Rejected::ConditionFailed {
            condition: name,
            requirement,
        }),
    }
}

/// Removes something from the entry of `name` with `remove`, and drops the entry when `remove`
/// says nothing is left in it.
fn remove_from_entry<V>(
    map: &mut HashMap<String, V>,
    name: &str,
    remove: impl FnOnce(&mut V) -> bool,
) {
    if let Some(entry) = map.get_mut(name)
        && remove(entry)
    {
        map.remove(name);
    }
}

/// Whether one label requirement holds for a label set.
pub fn requirement_holds(req: &LabelRequirement, labels: &LabelSet) -> bool {
    let value = labels.get(&req.key);
    match req.operator {
        LabelOperator::In => value.is_some_and(|v| req.values.iter().any(|x| x == v)),
        LabelOperator::NotIn => value.is_none_or(|v| !req.values.iter().any(|x| x == v)),
        LabelOperator::Exists => value.is_some(),
        LabelOperator::DoesNotExist => value.is_none(),
    }
}
