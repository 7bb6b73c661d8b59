//! What the deliveries of one alert share, written once: its message block and the title of a
//! notification of it alone, per language; and the one-alert Herald body, sent as its webhook's
//! start followed by the end its alert shares with its other deliveries (two parts, never
//! joined). Kept with the alert (see [`Alert::derived`]), so an alert matching ten webhooks is
//! rendered once, not ten times.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::{Content, HeadFields, HeraldTail, RenderError, WebhookRef, notification, write_head};
use crate::alert::{Alert, LabelSet};
use crate::crd::{Language, WebhookType};
use crate::object::ObjectKey;

/// One value per language, indexed by the language itself.
#[derive(Clone, Debug, Default)]
struct PerLanguage<T> {
    en: T,
    zh_cn: T,
}

impl<T> PerLanguage<T> {
    /// The value for a language.
    fn get(&self, language: Language) -> &T {
        match language {
            Language::En => &self.en,
            Language::ZhCn => &self.zh_cn,
        }
    }
}

/// What rendering keeps with an alert for all its deliveries, each made on first use.
#[derive(Default)]
struct AlertTexts {
    /// The alert's block of a message.
    message_blocks: PerLanguage<OnceLock<Box<str>>>,
    /// The title of a notification of this alert alone.
    titles: PerLanguage<OnceLock<Box<str>>>,
    /// The end of a Herald body carrying this alert alone.
    herald_tails: PerLanguage<OnceLock<SharedTail>>,
}

fn texts(alert: &Alert) -> Option<&AlertTexts> {
    alert.derived.get_or_default()
}

/// An alert's message block in a language, written once and shared by all its deliveries.
pub(super) fn message_block(alert: &Alert, language: Language) -> Cow<'_, str> {
    match texts(alert) {
        Some(texts) => Cow::Borrowed(
            texts
                .message_blocks
                .get(language)
                .get_or_init(|| super::write_message_block(alert, language).into_boxed_str()),
        ),
        None => Cow::Owned(super::write_message_block(alert, language)),
    }
}

/// The title of a notification of one alert (`firing` says whether it fires), written once
/// per language and shared by all its deliveries.
pub(super) fn title(alert: &Arc<Alert>, firing: usize, language: Language) -> Cow<'_, str> {
    let write = || super::title(std::slice::from_ref(alert), firing, language);
    match texts(alert) {
        Some(texts) => Cow::Borrowed(
            texts
                .titles
                .get(language)
                .get_or_init(|| write().into_boxed_str()),
        ),
        None => Cow::Owned(write()),
    }
}

/// The start of every Herald body a webhook receives outside tests (`{"version":...,"webhook":
/// {...},`): it depends on the webhook alone, so its target writes it once and each one-alert
/// delivery sends it first, followed by the end its alert shares.
#[derive(Clone, Debug)]
pub struct HeraldHead(Bytes);

impl HeraldHead {
    /// The start of the Herald bodies of a webhook.
    pub fn for_webhook(kind: WebhookType, webhook: &ObjectKey) -> Result<Self, RenderError> {
        let head = HeadFields {
            kind,
            test: false,
            webhook: &WebhookRef {
                namespace: &webhook.namespace,
                name: &webhook.name,
            },
        };
        let mut start = Vec::with_capacity(128);
        write_head(&mut start, &head).map_err(|e| RenderError(e.to_string()))?;
        // Kept for as long as the webhook: no spare capacity.
        Ok(HeraldHead(Bytes::copy_from_slice(&start)))
    }
}

/// A rendered request body: one buffer, or two sent back to back without being joined (a
/// one-alert Herald body: its webhook's start, then the end its alert shares).
#[derive(Clone, Debug, Default)]
pub struct RenderedBody([Bytes; 2]);

impl RenderedBody {
    /// The parts in order (the second may be empty).
    pub fn into_parts(self) -> [Bytes; 2] {
        self.0
    }
}

impl From<Vec<u8>> for RenderedBody {
    fn from(body: Vec<u8>) -> Self {
        RenderedBody([Bytes::from(body), Bytes::new()])
    }
}

/// The part of a one-alert Herald body that does not depend on the webhook (from `"language"`
/// to the end), with the batch values it was written for: a delivery whose group labels or
/// external URL differ writes its own.
#[derive(Debug)]
struct SharedTail {
    /// Group labels the tail was written with (the batch's own, when one of its deliveries
    /// wrote it).
    group_labels: Arc<LabelSet>,
    /// External URL the tail was written with.
    external_url: Arc<str>,
    /// The tail as a JSON object (`{"language":...}`); `None` if it could not be written.
    /// Shared, not copied, by every request body that ends with it.
    json: Option<Bytes>,
}

impl SharedTail {
    /// The end of a one-alert delivery's Herald body, to share with the alert's other
    /// deliveries in the same language.
    fn of(content: &Content<'_>, language: Language) -> Self {
        let notification = notification(*content, language);
        let mut json = Vec::with_capacity(tail_size_hint(&notification));
        let written = serde_json::to_writer(&mut json, &HeraldTail(&notification)).is_ok();
        SharedTail {
            group_labels: content.group_labels.clone(),
            external_url: content.external_url.clone(),
            json: written.then(|| Bytes::from(json)),
        }
    }

    /// The tail's JSON, if it was written for this batch's group labels and URL.
    fn usable_for(&self, group_labels: &LabelSet, external_url: &str) -> Option<&Bytes> {
        self.json.as_ref().filter(|_| {
            // The tail holds the batch's own values: the same object is the same value, and
            // the deliveries of a batch all share them, so comparing them is rarely needed.
            (std::ptr::eq(&*self.group_labels, group_labels) || *self.group_labels == *group_labels)
                && (std::ptr::eq(&*self.external_url, external_url)
                    || *self.external_url == *external_url)
        })
    }
}

/// About the length of a one-alert tail, so that it is written into one buffer rather than one
/// that doubles five times: the alert's JSON (written here if not yet), its labels and
/// annotations again as the common ones, the texts with room for escapes, and the rest.
fn tail_size_hint(notification: &super::Notification<'_>) -> usize {
    let json_len = |json: Option<&serde_json::value::RawValue>| json.map_or(0, |j| j.get().len());
    let alerts: usize = notification
        .alerts
        .iter()
        .map(|alert| {
            json_len(alert.json())
                + json_len(alert.labels_json())
                + json_len(alert.annotations_json())
        })
        .sum();
    let texts = notification.title.len() + notification.message.len();
    alerts + texts + texts / 8 + notification.external_url.len() + 256
}

/// A one-alert delivery's Herald body: `head`, then the end its alert shares with its other
/// deliveries in this language, written by the first of them (the only one that builds a
/// notification) and never copied. `None` when the usual rendering is needed: a test, several
/// alerts, or a shared end written for another batch.
pub(super) fn one_alert_herald_body(
    content: &Content<'_>,
    language: Language,
    head: &HeraldHead,
) -> Option<RenderedBody> {
    let [alert] = content.alerts else {
        return None;
    };
    if content.test {
        return None;
    }
    let tail = texts(alert)?
        .herald_tails
        .get(language)
        .get_or_init(|| SharedTail::of(content, language))
        .usable_for(content.group_labels, content.external_url)?
        .slice(1..);
    Some(RenderedBody([head.0.clone(), tail]))
}
