//! A webhook's delivery settings, resolved from its spec and Secrets: URL, credentials, TLS,
//! headers, signing keys and the HTTP client built from them.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::client::{ClientError, ClientSettings, DestinationGuard, HttpClient};
use super::policy::DestinationPolicy;
use crate::crd::{AuthType, BodyFormat, Language, WebhookSpec, WebhookType, is_reserved_header};
use crate::object::{NotReady, NotReadyReason, ObjectKey};
use crate::render;
use crate::secret::{Masker, SecretData, Sensitive};
use crate::tls::TlsError;

/// The `User-Agent` Herald sends.
pub const USER_AGENT: &str = concat!("herald/", env!("CARGO_PKG_VERSION"));

/// How much of an endpoint's answer a tenant sees, in characters.
const ANSWER_EXCERPT_CHARS: usize = 120;

/// Rules every target is built under.
#[derive(Clone, Debug, Default)]
pub struct TargetPolicy {
    /// Where webhooks may send.
    pub destinations: DestinationPolicy,
    /// Use only Secrets that carry the consent label or annotation (see [`crate::secret`]).
    pub require_secret_consent: bool,
}

impl TargetPolicy {
    /// The default rules with loopback destinations allowed (`herald run`, tests).
    pub fn allowing_loopback() -> Self {
        TargetPolicy {
            destinations: DestinationPolicy::allowing_loopback(),
            require_secret_consent: false,
        }
    }
}

/// Everything needed to send to one webhook. Secret material is held in [`Sensitive`] wrappers.
#[derive(Clone, Debug)]
pub struct Target {
    /// The webhook.
    pub key: ObjectKey,
    /// Alarms or Events.
    pub kind: WebhookType,
    /// The endpoint.
    pub uri: http::Uri,
    /// Language of titles and messages.
    pub language: Language,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Body format.
    pub format: BodyFormat,
    /// What most webhooks do without: boxed, so that thousands of plain webhooks stay small.
    extras: Option<Box<Extras>>,
    client: std::sync::Arc<HttpClient>,
    /// The start of this webhook's one-alert Herald bodies, written once; `None` for other
    /// formats and templates.
    herald_head: Option<render::HeraldHead>,
    /// The `Host` header of a plain-HTTP URL (always HTTP/1.1), written once instead of by the
    /// client on every request; `None` for HTTPS, where HTTP/2 may carry the authority instead.
    host: Option<HeaderValue>,
    /// The pace of this webhook's URL (chat formats by default, others when `spec.pace` says).
    pacer: Option<std::sync::Arc<super::pace::Pacer>>,
    /// The batching window, when `spec.batching` sets one.
    batching: Option<super::pace::Batching>,
}

/// A target's template, credentials, headers and signing keys.
#[derive(Clone, Debug)]
struct Extras {
    template: Option<std::sync::Arc<crate::template::SandboxedTemplate>>,
    authorization: Option<Sensitive<HeaderValue>>,
    headers: Sensitive<HeaderMap>,
    signing_keys: Vec<Sensitive<Vec<u8>>>,
    /// A chat robot's keyword, mentions and signing secret.
    robot: crate::chat::Robot,
    /// Every secret value this target sends, to mask them in anything the endpoint echoes back.
    masker: Masker,
}

impl Extras {
    fn is_empty(&self) -> bool {
        self.template.is_none()
            && self.authorization.is_none()
            && self.headers.expose().is_empty()
            && self.signing_keys.is_empty()
            && self.masker.is_empty()
            && self.robot == crate::chat::Robot::default()
    }
}

/// Everything about a webhook that shapes its HTTP client (not its requests).
struct Transport {
    insecure_skip_verify: bool,
    roots: Vec<u8>,
    identity: Option<Sensitive<Vec<u8>>>,
    proxy: Option<String>,
    guard: DestinationGuard,
    /// Which of the [`CLIENT_SHARDS`] clients for these settings the webhook uses.
    shard: u8,
}

/// Clients per set of transport settings: webhooks are spread over a few connection pools
/// rather than all sharing one pool's lock, while thousands of webhooks still cost a handful of
/// clients.
const CLIENT_SHARDS: u64 = 8;

/// The shard of a webhook's client: a stable hash of its key.
fn client_shard(key: &ObjectKey) -> u8 {
    use std::hash::Hasher as _;
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(key.namespace.as_bytes());
    hasher.write(&[0]);
    hasher.write(key.name.as_bytes());
    u8::try_from(hasher.finish() % CLIENT_SHARDS).unwrap_or(0)
}

type ClientCache =
    std::sync::Mutex<std::collections::HashMap<[u8; 32], std::sync::Weak<HttpClient>>>;

/// Clients in use, by transport digest: webhooks with equal settings share one.
static CLIENTS: std::sync::LazyLock<ClientCache> = std::sync::LazyLock::new(Default::default);

impl Transport {
    fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update([u8::from(self.insecure_skip_verify), self.shard]);
        // The policy object (alive as long as any client built under it) and the namespace
        // whose rules apply.
        hasher.update((self.guard.policy.identity() as u64).to_le_bytes());
        for part in [
            self.roots.as_slice(),
            self.identity
                .as_ref()
                .map_or(&[][..], |i| i.expose().as_slice()),
            self.proxy.as_deref().unwrap_or("").as_bytes(),
            self.guard.namespace.as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.finalize().into()
    }

    /// The shared client for these settings, built on first use.
    fn client(&self) -> Result<std::sync::Arc<HttpClient>, ClientError> {
        let digest = self.digest();
        let mut cache = CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = cache.get(&digest).and_then(std::sync::Weak::upgrade) {
            return Ok(client);
        }
        let client = std::sync::Arc::new(HttpClient::new(&ClientSettings {
            tls: crate::tls::TlsSettings {
                insecure_skip_verify: self.insecure_skip_verify,
                roots: &self.roots,
                identity: self.identity.as_ref().map(|i| i.expose().as_slice()),
            },
            proxy: self.proxy.as_deref(),
            guard: Some(&self.guard),
        })?);
        cache.retain(|_, weak| weak.strong_count() > 0);
        cache.insert(digest, std::sync::Arc::downgrade(&client));
        Ok(client)
    }
}

/// Names of every Secret a webhook spec refers to (all in the webhook's own namespace).
pub fn referenced_secrets(spec: &WebhookSpec) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    if spec.auth.kind != AuthType::None
        && let Some(r) = &spec.auth.secret_ref
    {
        names.insert(r.name.clone());
    }
    if let Some(tls) = &spec.tls {
        if let Some(r) = &tls.ca_secret_ref {
            names.insert(r.name.clone());
        }
        if let Some(r) = &tls.client_cert_secret_ref {
            names.insert(r.name.clone());
        }
    }
    if let Some(r) = &spec.headers_secret_ref {
        names.insert(r.name.clone());
    }
    if let Some(r) = &spec.proxy_secret_ref {
        names.insert(r.name.clone());
    }
    if let Some(s) = &spec.signing {
        names.insert(s.secret_ref.name.clone());
    }
    names
}

/// A referenced Secret, if it exists and Herald may use it: never a ServiceAccount token, and
/// with `--require-secret-consent` only a Secret that carries the consent mark.
fn secret<'a>(
    lookup: &impl Fn(&str) -> Option<&'a SecretData>,
    policy: &TargetPolicy,
    name: &str,
    purpose: &str,
) -> Result<&'a SecretData, NotReady> {
    let data = lookup(name).ok_or_else(|| {
        NotReady::new(
            NotReadyReason::SecretNotFound,
            format!("Secret {name:?} ({purpose}) not found in the webhook's namespace"),
        )
    })?;
    if data.is_service_account_token() {
        return Err(NotReady::new(
            NotReadyReason::SecretRefused,
            format!(
                "Secret {name:?} ({purpose}) holds a ServiceAccount token, which Herald never sends"
            ),
        ));
    }
    if policy.require_secret_consent && !data.is_consented() {
        return Err(NotReady::new(
            NotReadyReason::SecretRefused,
            format!(
                "Secret {name:?} ({purpose}) lacks the label or annotation {}: \"true\" by which its owner lets Herald use it",
                crate::secret::CONSENT_KEY
            ),
        ));
    }
    Ok(data)
}

fn secret_key<'a>(data: &'a SecretData, secret: &str, key: &str) -> Result<&'a [u8], NotReady> {
    data.get(key).ok_or_else(|| {
        NotReady::new(
            NotReadyReason::SecretKeyMissing,
            format!("Secret {secret:?} has no key {key:?}"),
        )
    })
}

fn text<'a>(data: &'a SecretData, secret: &str, name: &str) -> Result<&'a str, NotReady> {
    let bytes = secret_key(data, secret, name)?;
    std::str::from_utf8(bytes).map(str::trim).map_err(|_| {
        NotReady::new(
            NotReadyReason::SecretKeyMissing,
            format!("Secret {secret:?} key {name:?} is not UTF-8 text"),
        )
    })
}

fn invalid_spec(message: impl Into<String>) -> NotReady {
    NotReady::new(NotReadyReason::InvalidSpec, message)
}

/// Parses a Standard Webhooks secret list: `whsec_<base64>` entries separated by spaces, each
/// decoding to 24 to 64 bytes.
pub fn parse_signing_secrets(value: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut keys = Vec::new();
    for (i, entry) in value.split_whitespace().enumerate() {
        let encoded = entry
            .strip_prefix("whsec_")
            .ok_or_else(|| format!("secret #{} does not start with whsec_", i + 1))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| format!("secret #{} is not valid base64 after whsec_", i + 1))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "secret #{} decodes to {} bytes; 24 to 64 are required",
                i + 1,
                key.len()
            ));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err("no whsec_ secret found".into());
    }
    Ok(keys)
}

impl Target {
    /// Resolves a webhook's settings. `lookup` finds a Secret by name in the webhook's namespace.
    /// Errors carry the `Ready=False` reason; their messages never contain secret material.
    pub fn build<'a>(
        key: ObjectKey,
        spec: &WebhookSpec,
        policy: &TargetPolicy,
        lookup: impl Fn(&str) -> Option<&'a SecretData>,
    ) -> Result<Target, NotReady> {
        let secrets = Secrets { lookup, policy };
        let (uri, proxy) = checked_urls(&key, spec, &policy.destinations)?;
        let template = compiled_template(spec)?;
        // Every secret value the target sends, to mask in what endpoints echo back.
        let mut masker = Masker::default();
        let authorization = authorization(spec, &secrets, &mut masker)?;
        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            insert_header(&mut headers, name, value.as_bytes(), "spec.headers")?;
        }
        let proxy = proxy_with_credentials(proxy.as_ref(), spec, &secrets, &mut masker)?;
        if let Some(r) = &spec.headers_secret_ref {
            let data = secrets.get(&r.name, "headers")?;
            for (name, value) in data.iter() {
                let origin = format!("Secret {:?}", r.name);
                let value = trim_bytes(value);
                insert_header(&mut headers, name, value, &origin)?;
                masker.add(value);
            }
        }
        let (robot, signing_keys) = robot_and_signing_keys(spec, &secrets, &mut masker)?;
        let client = transport(&key, spec, &secrets, proxy)?
            .client()
            .map_err(not_ready_client)?;

        let extras = Extras {
            template,
            authorization,
            headers: Sensitive::new(headers),
            signing_keys,
            masker,
            robot,
        };
        let herald_head = (spec.format == BodyFormat::Herald && extras.template.is_none())
            .then(|| render::HeraldHead::for_webhook(spec.kind, &key))
            .transpose()
            .map_err(|e| invalid_spec(e.to_string()))?;
        Ok(Target {
            pacer: pace_windows(spec).map(|windows| super::pace::pacer_for(&spec.url, windows)),
            batching: batching(spec)?,
            herald_head,
            host: host_header(&uri),
            key,
            kind: spec.kind,
            uri,
            language: spec.language,
            timeout: Duration::from_secs(u64::from(spec.timeout_seconds.clamp(1, 300))),
            format: spec.format,
            extras: (!extras.is_empty()).then(|| Box::new(extras)),
            client,
        })
    }

    /// The compiled custom body template, if any.
    pub fn template(&self) -> Option<&std::sync::Arc<crate::template::SandboxedTemplate>> {
        self.extras.as_ref()?.template.as_ref()
    }

    /// What a tenant may see of an endpoint's answer: a short excerpt, every form of every
    /// secret value this target sends (token, password, header values, signing and proxy
    /// secrets) masked, control characters escaped; nothing when a secret is too short to
    /// mask.
    pub fn answer_excerpt(&self, answer: &[u8]) -> String {
        let text = String::from_utf8_lossy(answer);
        let masked = match self.extras.as_ref().map(|e| &e.masker) {
            None => Some(text.into_owned()),
            Some(masker) => masker.mask(&text),
        };
        let Some(masked) = masked else {
            return "(answer withheld: this webhook sends a secret too short to mask)".into();
        };
        let mut excerpt: String = crate::secret::escape_controls(masked.trim())
            .chars()
            .take(ANSWER_EXCERPT_CHARS)
            .collect();
        if excerpt.chars().count() == ANSWER_EXCERPT_CHARS {
            excerpt.push('…');
        }
        excerpt
    }

    /// How this webhook's bodies are rendered.
    pub(crate) fn body_style(&self) -> render::BodyStyle<'_> {
        render::BodyStyle {
            format: self.format,
            language: self.language,
            robot: self.robot(),
            template: self.template(),
            herald_head: self.herald_head.as_ref(),
        }
    }

    /// The `Host` header to send, when it is known in advance.
    pub(crate) fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// The HTTP client for this webhook.
    pub fn client(&self) -> &HttpClient {
        &self.client
    }

    /// The `Authorization` header, if any.
    pub(crate) fn authorization(&self) -> Option<&HeaderValue> {
        self.extras
            .as_ref()?
            .authorization
            .as_ref()
            .map(Sensitive::expose)
    }

    /// Extra headers (`spec.headers` and `headersSecretRef`).
    pub(crate) fn headers(&self) -> Option<&HeaderMap> {
        self.extras.as_ref().map(|e| e.headers.expose())
    }

    /// The pace of this webhook's URL, if it is paced.
    pub fn pacer(&self) -> Option<&super::pace::Pacer> {
        self.pacer.as_deref()
    }

    /// The batching window, if any.
    pub fn batching(&self) -> Option<super::pace::Batching> {
        self.batching
    }

    /// Whether queued deliveries are gathered into merged messages.
    pub(crate) fn gathers(&self) -> bool {
        self.pacer.is_some() || self.batching.is_some()
    }

    /// The chat robot's keyword, mentions and signing secret.
    pub(crate) fn robot(&self) -> &crate::chat::Robot {
        static NONE: std::sync::LazyLock<crate::chat::Robot> =
            std::sync::LazyLock::new(crate::chat::Robot::default);
        self.extras.as_ref().map_or(&NONE, |e| &e.robot)
    }

    /// Standard Webhooks signing keys (decoded), empty when signing is off.
    pub(crate) fn signing_keys(&self) -> impl Iterator<Item = &[u8]> {
        self.extras
            .iter()
            .flat_map(|e| e.signing_keys.iter())
            .map(|k| k.expose().as_slice())
    }
}

/// The Secrets a webhook may use: found by name in its namespace, under the target policy.
struct Secrets<'p, L> {
    lookup: L,
    policy: &'p TargetPolicy,
}

impl<'a, L: Fn(&str) -> Option<&'a SecretData>> Secrets<'_, L> {
    /// A referenced Secret, if it exists and may be used (see [`secret`]).
    fn get(&self, name: &str, purpose: &str) -> Result<&'a SecretData, NotReady> {
        secret(&self.lookup, self.policy, name, purpose)
    }
}

/// The webhook's URL (as a request URI) and proxy URL, parsed and held to the destination
/// policy: absolute http(s), no credentials in the URL, no refused address.
fn checked_urls(
    key: &ObjectKey,
    spec: &WebhookSpec,
    destinations: &DestinationPolicy,
) -> Result<(http::Uri, Option<url::Url>), NotReady> {
    let url = url::Url::parse(&spec.url)
        .map_err(|e| invalid_spec(format!("url is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid_spec("url must be an absolute http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Anyone who can read the Webhook could read them: credentials belong in a Secret.
        return Err(invalid_spec(
            "url must not carry credentials; use auth with a Secret instead",
        ));
    }
    let uri = http::Uri::try_from(url.as_str())
        .map_err(|e| invalid_spec(format!("url is not a valid URL: {e}")))?;
    let proxy = spec
        .proxy_url
        .as_deref()
        .map(url::Url::parse)
        .transpose()
        .map_err(|e| invalid_spec(format!("proxyURL is not usable: {e}")))?;
    for (field, checked) in [("url", Some(&url)), ("proxyURL", proxy.as_ref())] {
        if let Some(why) = checked.and_then(|u| destinations.refuse_url_host(&key.namespace, u)) {
            return Err(NotReady::new(
                NotReadyReason::ForbiddenAddress,
                format!("{field}: {why}; refused by the destination policy"),
            ));
        }
    }
    Ok((uri, proxy))
}

/// The webhook's custom template, compiled.
fn compiled_template(
    spec: &WebhookSpec,
) -> Result<Option<std::sync::Arc<crate::template::SandboxedTemplate>>, NotReady> {
    let Some(source) = &spec.template else {
        return Ok(None);
    };
    let template = render::compile_template(source).map_err(|e| {
        NotReady::new(
            NotReadyReason::InvalidTemplate,
            format!("spec.template: {e}"),
        )
    })?;
    Ok(Some(std::sync::Arc::new(template)))
}

/// The `Authorization` header of Bearer or Basic auth, from its Secret.
fn authorization<'a>(
    spec: &WebhookSpec,
    secrets: &Secrets<'_, impl Fn(&str) -> Option<&'a SecretData>>,
    masker: &mut Masker,
) -> Result<Option<Sensitive<HeaderValue>>, NotReady> {
    let kind = spec.auth.kind;
    if kind == AuthType::None {
        return Ok(None);
    }
    let name = &spec
        .auth
        .secret_ref
        .as_ref()
        .ok_or_else(|| invalid_spec("auth.secretRef is required for Bearer and Basic auth"))?
        .name;
    let data = secrets.get(name, "auth")?;
    let value = if kind == AuthType::Bearer {
        let token = text(data, name, "token")?;
        masker.add(token.as_bytes());
        format!("Bearer {token}")
    } else {
        let user = text(data, name, "username")?;
        let password = text(data, name, "password")?;
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        masker.add(password.as_bytes());
        masker.add(encoded.as_bytes());
        format!("Basic {encoded}")
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| {
        NotReady::new(
            NotReadyReason::InvalidHeader,
            format!("Secret {name:?} holds characters not allowed in an Authorization header"),
        )
    })?;
    value.set_sensitive(true);
    Ok(Some(Sensitive::new(value)))
}

/// The proxy URL to connect through, with the credentials of `proxySecretRef` when given.
fn proxy_with_credentials<'a>(
    proxy: Option<&url::Url>,
    spec: &WebhookSpec,
    secrets: &Secrets<'_, impl Fn(&str) -> Option<&'a SecretData>>,
    masker: &mut Masker,
) -> Result<Option<String>, NotReady> {
    match (proxy, &spec.proxy_secret_ref) {
        (Some(proxy), _) if !proxy.username().is_empty() || proxy.password().is_some() => Err(
            invalid_spec("proxyURL must not carry credentials; use proxySecretRef instead"),
        ),
        (None, Some(_)) => Err(invalid_spec("proxySecretRef needs proxyURL")),
        (Some(proxy), Some(r)) => {
            let data = secrets.get(&r.name, "proxy")?;
            let user = text(data, &r.name, "username")?;
            let password = text(data, &r.name, "password")?;
            masker.add(password.as_bytes());
            masker.add(
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{user}:{password}"))
                    .as_bytes(),
            );
            let mut with_credentials = proxy.clone();
            if with_credentials.set_username(user).is_err()
                || with_credentials.set_password(Some(password)).is_err()
            {
                return Err(invalid_spec("proxyURL cannot carry credentials"));
            }
            Ok(Some(with_credentials.to_string()))
        }
        (proxy, None) => Ok(proxy.map(|p| p.to_string())),
    }
}

/// Standard Webhooks signing keys, decoded.
type SigningKeys = Vec<Sensitive<Vec<u8>>>;

/// A chat robot's keyword, mentions and (DingTalk, Feishu) signing secret, and the Standard
/// Webhooks signing keys of every other format.
fn robot_and_signing_keys<'a>(
    spec: &WebhookSpec,
    secrets: &Secrets<'_, impl Fn(&str) -> Option<&'a SecretData>>,
    masker: &mut Masker,
) -> Result<(crate::chat::Robot, SigningKeys), NotReady> {
    let mut robot = crate::chat::Robot::default();
    if let Some(chat) = &spec.chat {
        robot.keyword = chat.keyword.clone();
        robot.mention_all = chat.mention_all;
        robot.mention_users = chat.mention_users.clone();
        robot.mention_mobiles = chat.mention_mobiles.clone();
    }
    let Some(signing) = &spec.signing else {
        return Ok((robot, Vec::new()));
    };
    let r = &signing.secret_ref;
    let data = secrets.get(&r.name, "signing")?;
    let value = text(data, &r.name, &r.key)?;
    // DingTalk and Feishu robots sign their own way, with the secret as the robot shows it.
    if matches!(spec.format, BodyFormat::Dingtalk | BodyFormat::Feishu) {
        if value.is_empty() {
            return Err(NotReady::new(
                NotReadyReason::InvalidSigningSecret,
                format!("Secret {:?} key {:?} is empty", r.name, r.key),
            ));
        }
        masker.add(value.as_bytes());
        robot.secret = Some(Sensitive::new(value.to_string()));
        return Ok((robot, Vec::new()));
    }
    for entry in value.split_whitespace() {
        masker.add(entry.as_bytes());
        masker.add(entry.trim_start_matches("whsec_").as_bytes());
    }
    let keys = parse_signing_secrets(value)
        .map_err(|e| {
            NotReady::new(
                NotReadyReason::InvalidSigningSecret,
                format!("Secret {:?} key {:?}: {e}", r.name, r.key),
            )
        })?
        .into_iter()
        .map(Sensitive::new)
        .collect();
    Ok((robot, keys))
}

/// The settings that shape the webhook's HTTP client: TLS from its Secrets, the proxy, and the
/// destination rules of its namespace. Webhooks with the same settings share a few clients and
/// their connection pools (see [`CLIENT_SHARDS`]); the timeout is set per request.
fn transport<'a>(
    key: &ObjectKey,
    spec: &WebhookSpec,
    secrets: &Secrets<'_, impl Fn(&str) -> Option<&'a SecretData>>,
    proxy: Option<String>,
) -> Result<Transport, NotReady> {
    let destinations = &secrets.policy.destinations;
    let mut transport = Transport {
        insecure_skip_verify: false,
        roots: Vec::new(),
        identity: None,
        proxy,
        guard: DestinationGuard {
            policy: destinations.clone(),
            // Namespaces without rules of their own share clients.
            namespace: if destinations.has_rules_for(&key.namespace) {
                key.namespace.clone()
            } else {
                std::sync::Arc::from("")
            },
        },
        shard: client_shard(key),
    };
    let Some(tls) = &spec.tls else {
        return Ok(transport);
    };
    transport.insecure_skip_verify = tls.insecure_skip_verify;
    if let Some(r) = &tls.ca_secret_ref {
        let data = secrets.get(&r.name, "CA bundle")?;
        let pem = secret_key(data, &r.name, &r.key)?;
        if crate::tls::check_roots(pem).is_err() {
            return Err(NotReady::new(
                NotReadyReason::InvalidCa,
                format!(
                    "Secret {:?} key {:?} holds no PEM certificate",
                    r.name, r.key
                ),
            ));
        }
        transport.roots = pem.to_vec();
    }
    if let Some(r) = &tls.client_cert_secret_ref {
        let data = secrets.get(&r.name, "client certificate")?;
        let mut pem = secret_key(data, &r.name, "tls.crt")?.to_vec();
        pem.push(b'\n');
        pem.extend_from_slice(secret_key(data, &r.name, "tls.key")?);
        if crate::tls::check_identity(&pem).is_err() {
            return Err(NotReady::new(
                NotReadyReason::InvalidClientCertificate,
                format!(
                    "Secret {:?}: tls.crt and tls.key are not a valid PEM certificate and key",
                    r.name
                ),
            ));
        }
        transport.identity = Some(Sensitive::new(pem));
    }
    Ok(transport)
}

/// Why a webhook's HTTP client could not be built, as its readiness.
fn not_ready_client(e: ClientError) -> NotReady {
    let reason = match e {
        ClientError::Proxy(_) => NotReadyReason::InvalidSpec,
        ClientError::Tls(TlsError::Roots(_)) => NotReadyReason::InvalidCa,
        ClientError::Tls(TlsError::Identity(_)) => NotReadyReason::InvalidClientCertificate,
    };
    NotReady::new(reason, e.to_string())
}

/// The batching window of `spec.batching`.
fn batching(spec: &WebhookSpec) -> Result<Option<super::pace::Batching>, NotReady> {
    let Some(b) = &spec.batching else {
        return Ok(None);
    };
    let max_wait = humantime::parse_duration(&b.max_wait)
        .ok()
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(3600))
        .ok_or_else(|| {
            invalid_spec(format!(
                "batching.maxWait {:?} is not a duration from 1ms to 1h",
                b.max_wait
            ))
        })?;
    Ok(Some(super::pace::Batching {
        max_wait,
        max_alerts: b.max_alerts.clamp(1, 1000) as usize,
    }))
}

/// A webhook's pace: `spec.pace` where set, else its chat platform's documented limit; `None`
/// for a webhook that is not paced.
fn pace_windows(spec: &WebhookSpec) -> Option<Vec<super::pace::Window>> {
    let default = crate::chat::default_pace(spec.format);
    let given = spec.pace.as_ref();
    let per_second = given.and_then(|p| p.per_second).or_else(|| {
        given
            .is_none()
            .then(|| default.and_then(|d| d.per_second))
            .flatten()
    });
    let per_minute = given.and_then(|p| p.per_minute).or_else(|| {
        given
            .is_none()
            .then(|| default.and_then(|d| d.per_minute))
            .flatten()
    });
    let windows: Vec<super::pace::Window> = [
        (Duration::from_secs(1), per_second),
        (Duration::from_secs(60), per_minute),
    ]
    .into_iter()
    .filter_map(|(per, max)| {
        Some(super::pace::Window {
            per,
            max: max?.max(1),
        })
    })
    .collect();
    (!windows.is_empty()).then_some(windows)
}

fn trim_bytes(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &value[start..end]
}

/// The `Host` header a plain-HTTP request to this URL carries: the host, and the port unless
/// it is 80 (as hyper's client would write it). `None` for other schemes.
fn host_header(uri: &http::Uri) -> Option<HeaderValue> {
    if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        return None;
    }
    let host = uri.host()?;
    let value = match uri.port() {
        Some(port) if port.as_u16() != 80 => HeaderValue::try_from(format!("{host}:{port}")),
        _ => HeaderValue::try_from(host),
    };
    value.ok()
}

fn insert_header(
    headers: &mut HeaderMap,
    name: &str,
    value: &[u8],
    origin: &str,
) -> Result<(), NotReady> {
    if is_reserved_header(name) {
        return Err(NotReady::new(
            NotReadyReason::InvalidHeader,
            format!("{origin} sets reserved header {name:?}"),
        ));
    }
    let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        NotReady::new(
            NotReadyReason::InvalidHeader,
            format!("{origin}: {name:?} is not a valid header name"),
        )
    })?;
    let mut value = HeaderValue::from_bytes(value).map_err(|_| {
        NotReady::new(
            NotReadyReason::InvalidHeader,
            format!(
                "{origin}: the value of header {name:?} holds characters not allowed in a header"
            ),
        )
    })?;
    value.set_sensitive(true);
    headers.insert(header, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> WebhookSpec {
        serde_saphyr::from_str(yaml).expect("spec yaml")
    }

    fn data(pairs: &[(&str, &str)]) -> SecretData {
        SecretData::from_pairs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        )
    }

    /// One policy for every target of these tests (as one Herald has): clients are shared
    /// only under the same policy.
    static POLICY: std::sync::LazyLock<TargetPolicy> =
        std::sync::LazyLock::new(TargetPolicy::default);

    fn build(spec: &WebhookSpec, secrets: &[(&str, SecretData)]) -> Result<Target, NotReady> {
        Target::build(ObjectKey::new("ns", "wh"), spec, &POLICY, |name| {
            secrets.iter().find(|(n, _)| *n == name).map(|(_, d)| d)
        })
    }

    #[test]
    fn bearer_token_is_read_and_trimmed() {
        let s = spec("url: http://x\nauth: {type: Bearer, secretRef: {name: a}}\n");
        let t = build(&s, &[("a", data(&[("token", "abc\n")]))]).expect("ready");
        assert_eq!(t.authorization().expect("auth"), "Bearer abc");
        assert!(
            !format!("{t:?}").contains("abc"),
            "Debug must not print the token"
        );
    }

    #[test]
    fn secret_values_are_masked_in_echoed_text() {
        let s = spec(
            "url: http://x\nauth: {type: Bearer, secretRef: {name: a}}\nheadersSecretRef: {name: h}\n",
        );
        let t = build(
            &s,
            &[
                ("a", data(&[("token", "tok-secret")])),
                ("h", data(&[("X-Key", "hdr-secret")])),
            ],
        )
        .expect("ready");
        assert_eq!(
            t.answer_excerpt(b"bad token tok-secret and key hdr-secret"),
            "bad token [redacted] and key [redacted]"
        );
        // Encoded and case-folded forms too, and control characters escaped.
        let echoed = "TOK-SECRET aGRyLXNlY3JldA== tok%2Dsecret\r\nforged";
        assert_eq!(
            t.answer_excerpt(echoed.as_bytes()),
            "[redacted] [redacted]A== [redacted]\\r\\nforged"
        );
    }

    #[test]
    fn basic_auth_encodes_username_and_password() {
        let s = spec("url: http://x\nauth: {type: Basic, secretRef: {name: a}}\n");
        let t = build(&s, &[("a", data(&[("username", "u"), ("password", "p")]))]).expect("ready");
        assert_eq!(t.authorization().expect("auth"), "Basic dTpw");
    }

    #[test]
    fn missing_secret_and_missing_key_have_their_own_reasons() {
        let s = spec("url: http://x\nauth: {type: Bearer, secretRef: {name: a}}\n");
        assert_eq!(
            build(&s, &[]).expect_err("missing").reason,
            NotReadyReason::SecretNotFound
        );
        let err = build(&s, &[("a", data(&[("other", "v")]))]).expect_err("no key");
        assert_eq!(err.reason, NotReadyReason::SecretKeyMissing);
        assert!(err.message.contains("token"));
    }

    #[test]
    fn invalid_ca_is_reported() {
        let s = spec("url: https://x\ntls: {caSecretRef: {name: ca, key: ca.crt}}\n");
        let err = build(&s, &[("ca", data(&[("ca.crt", "not a pem")]))]).expect_err("bad CA");
        assert_eq!(err.reason, NotReadyReason::InvalidCa);
    }

    #[test]
    fn reserved_or_invalid_headers_from_a_secret_are_refused() {
        let s = spec("url: http://x\nheadersSecretRef: {name: h}\n");
        let err = build(&s, &[("h", data(&[("Authorization", "x")]))]).expect_err("reserved");
        assert_eq!(err.reason, NotReadyReason::InvalidHeader);
        let err = build(&s, &[("h", data(&[("webhook-id", "x")]))]).expect_err("reserved");
        assert_eq!(err.reason, NotReadyReason::InvalidHeader);
        let t = build(&s, &[("h", data(&[("X-Api-Key", "k1\n")]))]).expect("ok");
        assert_eq!(
            t.headers()
                .and_then(|h| h.get("x-api-key"))
                .expect("header"),
            "k1"
        );
    }

    #[test]
    fn signing_secrets_are_validated() {
        let good = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32])
        );
        assert_eq!(
            parse_signing_secrets(&format!("{good} {good}"))
                .expect("two")
                .len(),
            2
        );
        assert!(parse_signing_secrets("whsec_!!!").is_err());
        assert!(parse_signing_secrets("abc").is_err());
        let short = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([1u8; 8])
        );
        assert!(parse_signing_secrets(&short).is_err());
        let s = spec("url: http://x\nsigning: {secretRef: {name: s, key: secret}}\n");
        let err = build(&s, &[("s", data(&[("secret", "whsec_nope")]))]).expect_err("bad");
        assert_eq!(err.reason, NotReadyReason::InvalidSigningSecret);
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_being_echoed() {
        let s = spec("url: 'https://user:s3cr3t-pw@hooks.example.com/x'\n");
        let err = build(&s, &[]).expect_err("refused");
        assert_eq!(err.reason, NotReadyReason::InvalidSpec);
        assert!(err.message.contains("credentials"), "{}", err.message);
        assert!(!err.message.contains("s3cr3t-pw"), "{}", err.message);
        let target =
            build(&spec("url: 'https://hooks.example.com:8443/x?y=1'\n"), &[]).expect("ok");
        assert_eq!(target.uri, "https://hooks.example.com:8443/x?y=1");
    }

    #[test]
    fn internal_destinations_and_proxies_are_refused_by_default() {
        let build_with = |yaml: &str, policy: &TargetPolicy| {
            Target::build(ObjectKey::new("ns", "wh"), &spec(yaml), policy, |_| None)
        };
        let deny = TargetPolicy::default();
        for yaml in [
            "url: 'http://169.254.169.254/latest/meta-data'\n",
            "url: 'http://[fe80::1]/x'\n",
            "url: 'http://metadata.google.internal/x'\n",
            "url: 'http://127.0.0.1:8081/api/v1/deliveries/x/replay'\n",
            "url: 'http://[::169.254.169.254]/x'\n",
            "url: 'http://hooks.example.com/x'\nproxyURL: 'http://127.0.0.1:3128'\n",
        ] {
            let err = build_with(yaml, &deny).expect_err(yaml);
            assert_eq!(err.reason, NotReadyReason::ForbiddenAddress, "{yaml}");
        }
        assert!(build_with("url: 'http://hooks.example.com/x'\n", &deny).is_ok());
        let open = TargetPolicy::allowing_loopback();
        assert!(build_with("url: 'http://127.0.0.1:9000/x'\n", &open).is_ok());
        assert!(build_with("url: 'http://169.254.169.254/x'\n", &open).is_err());
    }

    #[test]
    fn webhooks_with_the_same_transport_share_a_few_clients() {
        let a = build(&spec("url: http://a.example/x\ntimeoutSeconds: 5\n"), &[]).expect("a");
        let b = build(&spec("url: http://b.example/y\n"), &[]).expect("b");
        assert!(std::sync::Arc::ptr_eq(&a.client, &b.client));
        let proxied = build(
            &spec("url: http://a.example/x\nproxyURL: http://proxy.example:3128\n"),
            &[],
        )
        .expect("c");
        assert!(!std::sync::Arc::ptr_eq(&a.client, &proxied.client));
        assert_eq!(a.timeout, Duration::from_secs(5));
        // A hundred webhooks with equal settings are spread over a few shared clients.
        let clients: Vec<_> = (0..100)
            .map(|i| {
                Target::build(
                    ObjectKey::new("ns", format!("wh-{i}")),
                    &spec("url: http://a.example/x\n"),
                    &POLICY,
                    |_| None,
                )
                .expect("ready")
                .client
            })
            .collect();
        let distinct: std::collections::BTreeSet<_> =
            clients.iter().map(std::sync::Arc::as_ptr).collect();
        assert!(
            distinct.len() > 1 && distinct.len() as u64 <= CLIENT_SHARDS,
            "{} clients",
            distinct.len()
        );
    }

    #[test]
    fn host_header_is_written_once_for_plain_http_only() {
        let host = |url: &str| {
            host_header(&http::Uri::try_from(url).expect("uri"))
                .map(|v| v.to_str().expect("text").to_string())
        };
        assert_eq!(
            host("http://127.0.0.1:8080/x").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            host("http://hooks.example/x").as_deref(),
            Some("hooks.example")
        );
        assert_eq!(
            host("http://hooks.example:80/x").as_deref(),
            Some("hooks.example")
        );
        assert_eq!(host("http://[::1]:9000/").as_deref(), Some("[::1]:9000"));
        assert_eq!(host("https://hooks.example/x"), None);
    }

    #[test]
    fn referenced_secrets_lists_every_reference() {
        let s = spec(
            "url: http://x\nauth: {type: Bearer, secretRef: {name: a}}\ntls: {caSecretRef: {name: b, key: k}, clientCertSecretRef: {name: c}}\nheadersSecretRef: {name: d}\nsigning: {secretRef: {name: e, key: k}}\n",
        );
        let names: Vec<_> = referenced_secrets(&s).into_iter().collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
    }
}
