//! Secret material: values that must never reach a log, an Event, a status or a metric.

use std::collections::BTreeMap;
use std::fmt;

/// A value whose `Debug` and `Display` print `<redacted>`, so no log line can leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive<T>(T);

impl<T> Sensitive<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Sensitive(value)
    }

    /// The secret value, for the one place that must use it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<T> fmt::Display for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The label or annotation (value `"true"`) by which a Secret's owner consents to Herald
/// using it, when Herald runs with `--require-secret-consent`.
pub const CONSENT_KEY: &str = "herald.dev/use";

/// The type of the Secrets that hold ServiceAccount tokens, which Herald never uses.
pub const SERVICE_ACCOUNT_TOKEN_TYPE: &str = "kubernetes.io/service-account-token";

/// The decoded keys and values of one Kubernetes Secret, and what Herald needs to know about
/// the Secret itself.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData {
    values: BTreeMap<String, Sensitive<Vec<u8>>>,
    /// It holds a ServiceAccount token.
    service_account_token: bool,
    /// It carries the consent label or annotation.
    consented: bool,
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

impl SecretData {
    /// Builds from decoded key/value pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        SecretData {
            values: pairs
                .into_iter()
                .map(|(k, v)| (k, Sensitive::new(v)))
                .collect(),
            service_account_token: false,
            consented: false,
        }
    }

    /// Marks the Secret as consented (the label or annotation), for Secrets built by hand.
    pub fn with_consent(mut self, consented: bool) -> Self {
        self.consented = consented;
        self
    }

    /// Whether the Secret holds a ServiceAccount token (by its type or its annotation).
    pub fn is_service_account_token(&self) -> bool {
        self.service_account_token
    }

    /// Whether the Secret carries the consent label or annotation.
    pub fn is_consented(&self) -> bool {
        self.consented
    }

    /// Builds from a Kubernetes Secret (`data`, then `stringData` on top, as the API server does).
    pub fn from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Self {
        let mut pairs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (k, v) in secret.data.iter().flatten() {
            pairs.insert(k.clone(), v.0.clone());
        }
        for (k, v) in secret.string_data.iter().flatten() {
            pairs.insert(k.clone(), v.clone().into_bytes());
        }
        let meta = &secret.metadata;
        fn marked<'m>(map: &'m Option<BTreeMap<String, String>>, key: &str) -> Option<&'m str> {
            map.as_ref().and_then(|m| m.get(key)).map(String::as_str)
        }
        let consented = [&meta.labels, &meta.annotations]
            .into_iter()
            .any(|map| marked(map, CONSENT_KEY).is_some_and(|v| v.trim() == "true"));
        let service_account_token = secret.type_.as_deref() == Some(SERVICE_ACCOUNT_TOKEN_TYPE)
            || marked(&meta.annotations, "kubernetes.io/service-account.name").is_some();
        SecretData {
            service_account_token,
            consented,
            ..SecretData::from_pairs(pairs)
        }
    }

    /// The raw bytes of a key.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.values.get(key).map(|v| v.expose().as_slice())
    }

    /// Every key and value.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.values
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose().as_slice()))
    }

    /// A digest of the content, to notice changes without keeping copies around.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for (k, v) in self.iter() {
            hasher.update((k.len() as u64).to_le_bytes());
            hasher.update(k.as_bytes());
            hasher.update((v.len() as u64).to_le_bytes());
            hasher.update(v);
        }
        hasher.update([
            u8::from(self.service_account_token),
            u8::from(self.consented),
        ]);
        hasher.finalize().into()
    }
}

/// Secrets shorter than this cannot be masked without masking ordinary text too: an answer
/// from an endpoint that receives one is withheld rather than masked.
const SHORTEST_MASKABLE: usize = 6;

/// What replaces a secret in masked text.
const MASK: &str = "[redacted]";

/// Masks secret values, in the forms an endpoint may echo them (raw, URL-encoded, base64 in
/// either alphabet and at any alignment, any letter case), in text that came back from
/// elsewhere.
#[derive(Clone, Default)]
pub struct Masker {
    /// Every form to mask, ASCII-lowercased.
    forms: Vec<Sensitive<Vec<u8>>>,
    /// A secret too short to mask.
    has_short: bool,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Masker({} forms)", self.forms.len())
    }
}

impl Masker {
    /// Adds a secret value (ignored when empty).
    pub fn add(&mut self, secret: &[u8]) {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
        if secret.is_empty() {
            return;
        }
        if secret.len() < SHORTEST_MASKABLE {
            self.has_short = true;
        }
        let mut forms: Vec<Vec<u8>> = vec![secret.to_vec()];
        forms.push(
            percent_encoding::percent_encode(secret, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
                .into_bytes(),
        );
        forms.push(
            url::form_urlencoded::byte_serialize(secret)
                .collect::<String>()
                .into_bytes(),
        );
        // Base64 at each of the three alignments it can have inside a longer encoded text,
        // keeping only the characters that depend on the secret alone.
        for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
            for shift in 0..3usize {
                let mut bytes = vec![0u8; shift];
                bytes.extend_from_slice(secret);
                let encoded = engine.encode(&bytes);
                let skip = [0, 2, 3][shift];
                let whole = bytes.len() / 3 * 4 + [0, 1, 2][bytes.len() % 3];
                if let Some(middle) = encoded.get(skip..whole)
                    && middle.len() >= SHORTEST_MASKABLE
                {
                    forms.push(middle.as_bytes().to_vec());
                }
            }
        }
        for mut form in forms {
            form.make_ascii_lowercase();
            if !self.forms.iter().any(|f| *f.expose() == form) {
                self.forms.push(Sensitive::new(form));
            }
        }
        // Longest first, so that a form inside another is not masked first.
        self.forms
            .sort_by_key(|f| std::cmp::Reverse(f.expose().len()));
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    /// The text with every form of every secret masked; `None` when a secret is too short to
    /// be masked safely (the text must then be withheld).
    pub fn mask(&self, text: &str) -> Option<String> {
        if self.has_short {
            return None;
        }
        let mut out = text.to_string();
        for form in &self.forms {
            let form = form.expose();
            let mut lower = out.to_ascii_lowercase();
            let mut from = 0;
            while let Some(at) = find(&lower.as_bytes()[from..], form).map(|i| i + from) {
                // ASCII lowercasing keeps byte offsets, and a form is ASCII or starts and ends
                // where the secret's own UTF-8 does, so `at..at + len` is a char range unless
                // the secret is not UTF-8; then mask byte-wise through a lossy copy.
                let end = at + form.len();
                if out.is_char_boundary(at) && out.is_char_boundary(end) {
                    out.replace_range(at..end, MASK);
                    lower.replace_range(at..end, MASK);
                    from = at + MASK.len();
                } else {
                    from = end;
                }
            }
        }
        Some(out)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Text safe to show on one line of a log, a status or an Event: control characters (CR, LF,
/// ESC, ...) written as escapes, so that no text can forge a line or a terminal sequence.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().collect::<String>()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_values() {
        let data = SecretData::from_pairs([("token".to_string(), b"hunter2".to_vec())]);
        let printed = format!("{data:?} {:?}", Sensitive::new("hunter2"));
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("token"));
    }

    #[test]
    fn every_echoed_form_of_a_secret_is_masked() {
        use base64::Engine as _;
        let token = "Tok+en/secret=42";
        let mut masker = Masker::default();
        masker.add(token.as_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(token);
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{token}"));
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
        let encoded: String =
            percent_encoding::percent_encode(token.as_bytes(), percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let form: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
        for echoed in [
            token.to_string(),
            token.to_uppercase(),
            token.to_lowercase(),
            encoded.clone(),
            encoded.to_lowercase(),
            form,
            b64.clone(),
            url_safe,
            basic.clone(),
        ] {
            let text = format!("bad credentials: <{echoed}> end");
            let masked = masker.mask(&text).expect("maskable");
            assert!(masked.contains("[redacted]"), "{echoed}: {masked}");
            assert!(!masked.contains(&echoed), "{echoed}: {masked}");
            assert!(masked.starts_with("bad credentials: <") && masked.ends_with("> end"));
        }
        // Inside a Basic credential, the secret's part of the encoding is masked.
        let masked = masker.mask(&basic).expect("maskable");
        assert!(masked.contains("[redacted]"), "{masked}");
        assert_eq!(
            masker.mask("nothing to hide").as_deref(),
            Some("nothing to hide")
        );
    }

    #[test]
    fn short_secrets_withhold_the_text() {
        let mut masker = Masker::default();
        masker.add(b"abc");
        assert_eq!(masker.mask("abc said no"), None);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("a\r\nb\x1b[31m"), "a\\r\\nb\\u{1b}[31m");
        assert_eq!(escape_controls("plain ✓"), "plain ✓");
    }
}
