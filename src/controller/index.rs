//! What the controller knows of the cluster between watch events, fed by those events alone
//! (apply, delete, and the begin and end of a list) and touching nothing else: which Webhooks
//! and NotificationConditions exist and whether a new version changes anything Herald reads,
//! which Secrets each Webhook references, the Secret data read so far, and whether every watch
//! has shown everything once. The plumbing in the parent module acts on what it answers.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use kube::ResourceExt;

use crate::crd::{NotificationCondition, TEST_ANNOTATION, Webhook};
use crate::delivery::referenced_secrets;
use crate::object::ObjectKey;
use crate::secret::SecretData;

use super::relist::Relist;

/// What is kept of a Webhook between events.
#[derive(Debug)]
pub struct WebhookEntry {
    /// A digest of what Herald reads from the object (uid, generation, labels, test token):
    /// a new version with the same digest is one of Herald's own status writes, or a change
    /// of something Herald ignores.
    inputs: u64,
    /// The Secrets it references, for those that reference any.
    secrets: Box<[Box<str>]>,
    /// Its `herald.dev/send-test` token, when set.
    token: Option<Box<str>>,
}

/// What is kept of a NotificationCondition between events: a digest of its uid and generation
/// (the version last applied; its own status writes keep both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConditionEntry(u64);

impl ConditionEntry {
    fn of(condition: &NotificationCondition) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        condition.metadata.uid.hash(&mut hasher);
        condition.metadata.generation.hash(&mut hasher);
        ConditionEntry(hasher.finish())
    }
}

/// What is known of one Secret.
#[derive(Debug, Default)]
struct SecretEntry {
    /// Its resourceVersion as the metadata watch last showed it (`None` before that).
    version: Option<String>,
    /// Its data as last read; `Some(None)` records that it did not exist.
    data: Option<Option<SecretData>>,
    /// Counts the changes seen: a read begun before a change must not be kept after it.
    epoch: u64,
}

/// The `herald.dev/send-test` token of a Webhook, when set.
pub fn test_token(webhook: &Webhook) -> Option<&str> {
    webhook
        .annotations()
        .get(TEST_ANNOTATION)
        .map(String::as_str)
        .filter(|t| !t.is_empty())
}

/// The namespace/name of a namespaced object, when it has both.
pub fn key_of<K: ResourceExt>(object: &K) -> Option<ObjectKey> {
    Some(ObjectKey::new(
        object.meta().namespace.as_deref()?,
        object.meta().name.as_deref()?,
    ))
}

/// The digest of what Herald reads from a Webhook outside its spec's content: its identity and
/// generation (which change with the spec), its labels (for `webhookSelector`) and test token.
pub fn webhook_inputs(webhook: &Webhook) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    webhook.metadata.uid.hash(&mut hasher);
    match webhook.metadata.generation {
        Some(generation) => generation.hash(&mut hasher),
        // Without a generation every version counts as new.
        None => webhook.metadata.resource_version.hash(&mut hasher),
    }
    webhook.metadata.labels.hash(&mut hasher);
    test_token(webhook).hash(&mut hasher);
    hasher.finish()
}

/// The kinds the index keeps per watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `Webhook`.
    Webhook,
    /// `NotificationCondition`.
    Condition,
}

impl Kind {
    /// The kind's name, as metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Webhook => "Webhook",
            Kind::Condition => "NotificationCondition",
        }
    }
}

fn begin_in<V>(relists: &mut [Relist<V>], watch: usize) -> bool {
    relists.get_mut(watch).is_some_and(|relist| {
        relist.begin();
        relist.is_synced()
    })
}

fn delete_in<V>(relists: &mut [Relist<V>], watch: usize, key: &ObjectKey) -> bool {
    relists
        .get_mut(watch)
        .is_some_and(|relist| relist.delete(key).is_some())
}

fn finish_in<V>(relists: &mut [Relist<V>], watch: usize) -> Vec<ObjectKey> {
    relists
        .get_mut(watch)
        .map(|relist| relist.finish().into_iter().map(|(key, _)| key).collect())
        .unwrap_or_default()
}

/// The controller's index: one [`Relist`] per watch for Webhooks and for conditions (a watch
/// per watched namespace, or one for all), and the Secrets seen and read.
#[derive(Debug)]
pub struct Index {
    /// The watched namespaces, in watch order; empty when one watch covers every namespace.
    namespaces: Vec<String>,
    webhooks: Vec<Relist<WebhookEntry>>,
    conditions: Vec<Relist<ConditionEntry>>,
    secrets: HashMap<ObjectKey, SecretEntry>,
}

impl Index {
    /// An empty index for watches of these namespaces (empty: one watch of all).
    pub fn new(namespaces: &[String]) -> Self {
        let watches = namespaces.len().max(1);
        Index {
            namespaces: namespaces.to_vec(),
            webhooks: (0..watches).map(|_| Relist::default()).collect(),
            conditions: (0..watches).map(|_| Relist::default()).collect(),
            secrets: HashMap::new(),
        }
    }

    /// The watch that covers a namespace.
    pub fn watch_of(&self, namespace: &str) -> Option<usize> {
        if self.namespaces.is_empty() {
            return Some(0);
        }
        self.namespaces.iter().position(|ns| ns == namespace)
    }

    /// A watch of `kind` begins a list; whether it is a re-list (not its first).
    pub fn begin(&mut self, kind: Kind, watch: usize) -> bool {
        match kind {
            Kind::Webhook => begin_in(&mut self.webhooks, watch),
            Kind::Condition => begin_in(&mut self.conditions, watch),
        }
    }

    /// An object of `kind` was deleted; whether it was known.
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) -> bool {
        let Some(watch) = self.watch_of(&key.namespace) else {
            return false;
        };
        match kind {
            Kind::Webhook => delete_in(&mut self.webhooks, watch, key),
            Kind::Condition => delete_in(&mut self.conditions, watch, key),
        }
    }

    /// A watch of `kind` completed a list: the objects it did not name, which are gone.
    pub fn finish(&mut self, kind: Kind, watch: usize) -> Vec<ObjectKey> {
        match kind {
            Kind::Webhook => finish_in(&mut self.webhooks, watch),
            Kind::Condition => finish_in(&mut self.conditions, watch),
        }
    }

    /// Whether every Webhook and condition watch has completed its first list.
    pub fn is_synced(&self) -> bool {
        self.webhooks.iter().all(Relist::is_synced) && self.conditions.iter().all(Relist::is_synced)
    }

    /// A Webhook exists; whether Herald must reconcile it (new, or changed in what Herald reads).
    pub fn apply_webhook(&mut self, watch: usize, webhook: &Webhook) -> bool {
        let (Some(key), Some(relist)) = (key_of(webhook), self.webhooks.get_mut(watch)) else {
            return false;
        };
        let inputs = webhook_inputs(webhook);
        let entry = WebhookEntry {
            inputs,
            secrets: referenced_secrets(&webhook.spec)
                .into_iter()
                .map(String::into_boxed_str)
                .collect(),
            token: test_token(webhook).map(Box::from),
        };
        relist
            .apply(key, entry)
            .is_none_or(|previous| previous.inputs != inputs)
    }

    /// Whether a Webhook is known (shown by its watch and not deleted since).
    pub fn knows_webhook(&self, key: &ObjectKey) -> bool {
        self.watch_of(&key.namespace)
            .and_then(|watch| self.webhooks.get(watch))
            .is_some_and(|relist| relist.get(key).is_some())
    }

    /// Whether this version of a Webhook is the one last applied (a reconcile that finishes
    /// late is still current).
    pub fn is_current(&self, webhook: &Webhook) -> bool {
        let Some(key) = key_of(webhook) else {
            return false;
        };
        self.watch_of(&key.namespace)
            .and_then(|watch| self.webhooks.get(watch))
            .and_then(|relist| relist.get(&key))
            .is_some_and(|entry| entry.inputs == webhook_inputs(webhook))
    }

    /// Every Webhook with a test token, and the token.
    pub fn test_tokens(&self) -> impl Iterator<Item = (&ObjectKey, &str)> {
        self.webhooks.iter().flat_map(|relist| {
            relist
                .iter()
                .filter_map(|(key, entry)| Some((key, entry.token.as_deref()?)))
        })
    }

    /// A condition exists; whether it is new or a new generation (its own status writes are not).
    pub fn apply_condition(&mut self, watch: usize, condition: &NotificationCondition) -> bool {
        let (Some(key), Some(relist)) = (key_of(condition), self.conditions.get_mut(watch)) else {
            return false;
        };
        let entry = ConditionEntry::of(condition);
        let changed = condition.metadata.generation.is_none() || relist.get(&key) != Some(&entry);
        relist.apply(key, entry);
        changed
    }

    /// Whether this version of a condition is the one last applied.
    pub fn is_current_condition(&self, condition: &NotificationCondition) -> bool {
        key_of(condition).is_some_and(|key| {
            self.watch_of(&key.namespace)
                .and_then(|watch| self.conditions.get(watch))
                .and_then(|relist| relist.get(&key))
                == Some(&ConditionEntry::of(condition))
        })
    }

    /// Every known condition.
    pub fn conditions(&self) -> impl Iterator<Item = (&ObjectKey, &ConditionEntry)> {
        self.conditions.iter().flat_map(Relist::iter)
    }

    /// The Secret watch shows a Secret's version (`None`: deleted). Returns the Webhooks to
    /// reconcile again: those referencing a Secret that changed, or that appeared after a read
    /// found it missing. The first sighting of a Secret never read changes nothing.
    pub fn secret_seen(&mut self, key: &ObjectKey, version: Option<&str>) -> Vec<ObjectKey> {
        let entry = self.secrets.entry(key.clone()).or_default();
        if entry.version.as_deref() == version {
            return Vec::new();
        }
        let known = entry.version.is_some() || matches!(entry.data, Some(None));
        entry.version = version.map(str::to_string);
        entry.data = None;
        entry.epoch += 1;
        if !known {
            return Vec::new();
        }
        let mut affected: Vec<ObjectKey> = self
            .webhooks
            .iter()
            .flat_map(Relist::iter)
            .filter(|(webhook, entry)| {
                webhook.namespace == key.namespace
                    && entry.secrets.iter().any(|name| **name == *key.name)
            })
            .map(|(webhook, _)| webhook.clone())
            .collect();
        affected.sort();
        affected
    }

    /// A Secret's data as last read (`Some(None)`: it did not exist), if still current.
    pub fn secret(&self, key: &ObjectKey) -> Option<&Option<SecretData>> {
        self.secrets.get(key).and_then(|e| e.data.as_ref())
    }

    /// The change count of a Secret, taken when a read of it begins.
    pub fn secret_epoch(&self, key: &ObjectKey) -> u64 {
        self.secrets.get(key).map_or(0, |e| e.epoch)
    }

    /// Keeps what a read found, unless the Secret changed since the read began (`epoch`).
    pub fn store_secret(&mut self, key: &ObjectKey, epoch: u64, data: Option<SecretData>) {
        let entry = self.secrets.entry(key.clone()).or_default();
        if entry.epoch == epoch {
            entry.data = Some(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(name: &str, generation: i64, extra: &str) -> Webhook {
        serde_saphyr::from_str(&format!(
            "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: {name}, namespace: ns, uid: u-{name}, generation: {generation}{extra}}}\nspec: {{url: 'https://example.com/hook', headersSecretRef: {{name: creds}}}}\n"
        ))
        .expect("webhook yaml")
    }

    fn condition(name: &str, generation: i64) -> NotificationCondition {
        serde_saphyr::from_str(&format!(
            "apiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: {name}, namespace: ns, uid: u-{name}, generation: {generation}}}\nspec: {{matchExpressions: [{{key: severity, operator: Exists}}]}}\n"
        ))
        .expect("condition yaml")
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name)
    }

    #[test]
    fn only_new_generations_labels_or_tokens_need_a_reconcile() {
        let mut index = Index::new(&[]);
        assert!(
            !index.begin(Kind::Webhook, 0),
            "the first list is not a re-list"
        );
        assert!(index.apply_webhook(0, &webhook("a", 1, "")));
        assert!(!index.is_synced());
        assert!(index.finish(Kind::Webhook, 0).is_empty());
        assert!(index.begin(Kind::Condition, 0) || !index.is_synced());
        index.finish(Kind::Condition, 0);
        assert!(index.is_synced());

        // Herald's own status write: same generation, nothing to do.
        assert!(!index.apply_webhook(0, &webhook("a", 1, "")));
        assert!(index.apply_webhook(0, &webhook("a", 2, "")));
        assert!(index.apply_webhook(0, &webhook("a", 2, ", labels: {team: a}")));
        let tested = webhook(
            "a",
            2,
            ", labels: {team: a}, annotations: {herald.dev/send-test: t1}",
        );
        assert!(index.apply_webhook(0, &tested));
        assert!(index.is_current(&tested));
        assert!(!index.is_current(&webhook("a", 1, "")));
        assert_eq!(index.test_tokens().collect::<Vec<_>>(), [(&key("a"), "t1")]);
    }

    #[test]
    fn a_relist_reports_what_went_away_per_watch() {
        let mut index = Index::new(&["ns".to_string(), "other".to_string()]);
        for watch in 0..2 {
            index.begin(Kind::Webhook, watch);
            index.finish(Kind::Webhook, watch);
            index.begin(Kind::Condition, watch);
            index.finish(Kind::Condition, watch);
        }
        index.apply_webhook(0, &webhook("a", 1, ""));
        index.apply_webhook(0, &webhook("b", 1, ""));
        index.apply_condition(0, &condition("c", 1));
        assert!(index.begin(Kind::Webhook, 0), "a re-list");
        index.apply_webhook(0, &webhook("b", 1, ""));
        assert_eq!(index.finish(Kind::Webhook, 0), [key("a")]);
        assert!(index.begin(Kind::Condition, 0));
        assert_eq!(index.finish(Kind::Condition, 0), [key("c")]);
        // The other namespace's watch knew none of them.
        assert!(index.begin(Kind::Webhook, 1));
        assert!(index.finish(Kind::Webhook, 1).is_empty());
        assert!(index.delete(Kind::Webhook, &key("b")));
        assert!(!index.delete(Kind::Webhook, &key("b")));
    }

    #[test]
    fn conditions_need_applying_only_for_a_new_generation() {
        let mut index = Index::new(&[]);
        assert!(index.apply_condition(0, &condition("c", 1)));
        assert!(!index.apply_condition(0, &condition("c", 1)));
        assert!(index.apply_condition(0, &condition("c", 2)));
        assert!(index.is_current_condition(&condition("c", 2)));
        assert!(!index.is_current_condition(&condition("c", 1)));
        assert!(index.delete(Kind::Condition, &key("c")));
        assert_eq!(index.conditions().count(), 0);
    }

    #[test]
    fn a_secret_change_brings_back_the_webhooks_that_read_it() {
        let mut index = Index::new(&[]);
        index.apply_webhook(0, &webhook("a", 1, ""));
        index.apply_webhook(0, &webhook("b", 1, ""));
        let creds = key("creds");
        // First sighting before any read: nothing to redo.
        assert!(index.secret_seen(&creds, Some("1")).is_empty());
        let epoch = index.secret_epoch(&creds);
        index.store_secret(&creds, epoch, None);
        assert_eq!(index.secret(&creds), Some(&None));
        // The same version again (a re-list) changes nothing and keeps the data.
        assert!(index.secret_seen(&creds, Some("1")).is_empty());
        assert_eq!(index.secret(&creds), Some(&None));
        // A new version: both webhooks are read again, and the cached data is dropped.
        assert_eq!(index.secret_seen(&creds, Some("2")), [key("a"), key("b")]);
        assert_eq!(index.secret(&creds), None);
        // A read begun before a change is not kept.
        let before = index.secret_epoch(&creds);
        index.secret_seen(&creds, Some("3"));
        index.store_secret(&creds, before, None);
        assert_eq!(index.secret(&creds), None);
        // Deleted: the webhooks learn it.
        assert_eq!(index.secret_seen(&creds, None), [key("a"), key("b")]);
    }

    #[test]
    fn a_missing_secret_that_appears_brings_back_its_webhooks() {
        let mut index = Index::new(&[]);
        index.apply_webhook(0, &webhook("a", 1, ""));
        let creds = key("creds");
        index.store_secret(&creds, index.secret_epoch(&creds), None);
        assert_eq!(index.secret_seen(&creds, Some("1")), [key("a")]);
    }
}
