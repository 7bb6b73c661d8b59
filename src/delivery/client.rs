//! The HTTP client deliveries go out on: hyper's pooled client over rustls, with the trust
//! roots, client certificate, proxy and address guard a webhook's transport settings ask for.
//!
//! Herald sends one kind of request (a POST with a ready body, no redirects, no cookies), so it
//! uses hyper's client directly rather than a general-purpose one: every layer a request passes
//! through is paid for on every delivery.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::policy::DestinationPolicy;
use crate::secret::Sensitive;

/// How long opening a TCP connection may take (the request timeout covers the rest).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an unused pooled connection stays open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything about a webhook that shapes its HTTP client (not its requests).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientSettings<'a> {
    /// What the client trusts and how it identifies itself.
    pub tls: crate::tls::TlsSettings<'a>,
    /// `http://` or `https://` proxy, credentials in its user info.
    pub proxy: Option<&'a str>,
    /// The destination policy every connection is checked against (for a namespace's
    /// webhooks); `None` for Herald's own calls (the admin API client).
    pub guard: Option<&'a DestinationGuard>,
}

/// The destination policy as it applies to one namespace's webhooks (or to every namespace
/// without rules of its own, under the empty name).
#[derive(Clone, Debug)]
pub struct DestinationGuard {
    /// The policy.
    pub policy: DestinationPolicy,
    /// The namespace whose rules apply.
    pub namespace: Arc<str>,
}

/// A connection refused by the destination policy.
#[derive(Debug, thiserror::Error)]
#[error("refused by the destination policy: {0}")]
pub struct PolicyRefusal(pub String);

impl DestinationGuard {
    /// Refuses a destination by its name, or by its address when the URI holds one.
    fn check_uri(&self, uri: &Uri) -> Result<(), PolicyRefusal> {
        let Some(host) = uri.host() else {
            return Ok(());
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let why = match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let port =
                    uri.port_u16()
                        .unwrap_or(if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                            443
                        } else {
                            80
                        });
                self.policy
                    .refuse_address(&self.namespace, None, SocketAddr::new(ip, port))
            }
            Err(_) => self.policy.refuse_name(&self.namespace, bare),
        };
        why.map_or(Ok(()), |why| Err(PolicyRefusal(why)))
    }

    /// Refuses a connection by the address it actually reached.
    fn check_peer(&self, stream: &TcpStream, host: Option<&str>) -> Result<(), PolicyRefusal> {
        let peer = stream
            .peer_addr()
            .map_err(|e| PolicyRefusal(format!("the peer address is unknown: {e}")))?;
        match self.policy.refuse_address(&self.namespace, host, peer) {
            Some(why) => Err(PolicyRefusal(why)),
            None => Ok(()),
        }
    }
}

/// Whether a request failed because the destination policy refused its connection.
pub fn is_policy_refusal(err: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        // An `io::Error` wrapping one hides it from `source()`.
        let wrapped = cause
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .is_some_and(|inner| inner.is::<PolicyRefusal>());
        if wrapped || cause.is::<PolicyRefusal>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Why a client could not be built. Messages never contain secret material.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The proxy URL cannot be used.
    #[error("proxyURL is not usable: {0}")]
    Proxy(String),
    /// The CA bundle or the client certificate cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// A pooled HTTP/1.1 and HTTP/2 client for one set of transport settings.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<SharedConnector, RequestBody>,
    /// `Proxy-Authorization` for plain-HTTP requests sent through the proxy (a CONNECT tunnel
    /// carries it in the CONNECT request instead).
    proxy_authorization: Option<Sensitive<HeaderValue>>,
}

impl HttpClient {
    /// Builds a client; connections are opened on first use.
    pub fn new(settings: &ClientSettings<'_>) -> Result<Self, ClientError> {
        let tls = crate::tls::client_config(&settings.tls)?;
        let guard = settings.guard.cloned();
        let mut direct = HttpConnector::new_with_resolver(Resolver {
            guard: guard.clone(),
        });
        direct.enforce_http(false);
        direct.set_nodelay(true);
        direct.set_connect_timeout(Some(CONNECT_TIMEOUT));

        let (proxy, proxy_authorization) = match settings.proxy {
            None => (None, None),
            Some(text) => {
                let proxy = ProxyAddress::parse(text)?;
                // The connection to the proxy itself: TLS for an `https://` proxy, never h2.
                let mut to_proxy_tls = tls.clone();
                to_proxy_tls.alpn_protocols.clear();
                let to_proxy = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(to_proxy_tls)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(direct.clone());
                let mut tunnel = Tunnel::new(proxy.uri.clone(), to_proxy.clone());
                if let Some(auth) = &proxy.authorization {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                if let Some(guard) = &guard {
                    guard
                        .check_uri(&proxy.uri)
                        .map_err(|e| ClientError::Proxy(e.to_string()))?;
                }
                let route = ProxyRoute {
                    uri: proxy.uri,
                    to_proxy,
                    tunnel,
                };
                (
                    Some(Arc::new(route)),
                    proxy.authorization.map(Sensitive::new),
                )
            }
        };
        let connector = SharedConnector(Arc::new(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(RouteConnector {
                    direct,
                    proxy,
                    guard: guard.map(Arc::new),
                }),
        ));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(HttpClient {
            client,
            proxy_authorization,
        })
    }

    /// Sends a request. A plain-HTTP request through a proxy gets the proxy's credentials.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        if let Some(auth) = &self.proxy_authorization
            && request.uri().scheme() == Some(&http::uri::Scheme::HTTP)
        {
            request
                .headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth.expose().clone());
        }
        self.client.request(request).await
    }
}

/// A request body of one or two parts sent back to back, never joined into one buffer (see
/// [`crate::render::RenderedBody`]).
#[derive(Clone, Debug, Default)]
pub struct RequestBody {
    parts: [Bytes; 2],
}

impl RequestBody {
    /// A body of two parts sent in order (either may be empty).
    pub fn from_parts(parts: [Bytes; 2]) -> Self {
        RequestBody { parts }
    }

    /// The parts in order (an empty part is skipped when sending).
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(|part| &part[..])
    }
}

impl From<Bytes> for RequestBody {
    fn from(body: Bytes) -> Self {
        RequestBody::from_parts([body, Bytes::new()])
    }
}

impl From<Vec<u8>> for RequestBody {
    fn from(body: Vec<u8>) -> Self {
        RequestBody::from(Bytes::from(body))
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let parts = &mut self.get_mut().parts;
        let next = parts.iter_mut().find(|part| !part.is_empty());
        Poll::Ready(next.map(|part| Ok(hyper::body::Frame::data(std::mem::take(part)))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.iter().all(Bytes::is_empty)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let length: usize = self.parts.iter().map(Bytes::len).sum();
        hyper::body::SizeHint::with_exact(u64::try_from(length).unwrap_or(u64::MAX))
    }
}

/// Describes a failed request for a delivery record: what failed and why, from the error's
/// causes (hyper's errors carry no URL, and the proxy credentials never reach them).
pub fn describe_error(err: &hyper_util::client::legacy::Error) -> String {
    let mut message = if err.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// A proxy URL taken apart: where to connect, and the credentials from its user info.
struct ProxyAddress {
    uri: Uri,
    authorization: Option<HeaderValue>,
}

impl ProxyAddress {
    fn parse(text: &str) -> Result<Self, ClientError> {
        let url = url::Url::parse(text).map_err(|e| ClientError::Proxy(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ClientError::Proxy(format!(
                "scheme {:?} is not supported (http or https)",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| ClientError::Proxy("it has no host".into()))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| ClientError::Proxy("it has no port".into()))?;
        let uri = Uri::builder()
            .scheme(url.scheme())
            .authority(format!("{host}:{port}"))
            .path_and_query("/")
            .build()
            .map_err(|e| ClientError::Proxy(e.to_string()))?;
        let authorization = if url.username().is_empty() && url.password().is_none() {
            None
        } else {
            let decode = |part: &str| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8()
                    .map(|text| text.into_owned())
                    .map_err(|_| ClientError::Proxy("its credentials are not valid UTF-8".into()))
            };
            let user = decode(url.username())?;
            let password = decode(url.password().unwrap_or(""))?;
            let token = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{user}:{password}"),
            );
            let mut value = HeaderValue::try_from(format!("Basic {token}"))
                .map_err(|_| ClientError::Proxy("its credentials cannot be sent".into()))?;
            value.set_sensitive(true);
            Some(value)
        };
        Ok(ProxyAddress { uri, authorization })
    }
}

/// Resolves host names with the system resolver, dropping the addresses the destination
/// policy refuses (so that a name cannot lead there; the connection is checked again by the
/// address it reaches, with its port).
#[derive(Clone, Debug)]
struct Resolver {
    guard: Option<DestinationGuard>,
}

type Resolving = Pin<Box<dyn Future<Output = io::Result<std::vec::IntoIter<SocketAddr>>> + Send>>;

impl tower::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str();
            let mut refusal = None;
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
                .await?
                .filter(|address| {
                    let Some(guard) = &guard else { return true };
                    match guard
                        .policy
                        .refuse_address(&guard.namespace, Some(host), *address)
                    {
                        None => true,
                        Some(why) => {
                            refusal.get_or_insert(why);
                            false
                        }
                    }
                })
                .collect();
            if addresses.is_empty() {
                return Err(match refusal {
                    Some(why) => io::Error::other(PolicyRefusal(format!(
                        "{host} resolves only to refused addresses ({why})"
                    ))),
                    None => io::Error::other(format!("{host} resolves to no address")),
                });
            }
            Ok(addresses.into_iter())
        })
    }
}

type TcpConnector = HttpConnector<Resolver>;
type ProxyStream = MaybeHttpsStream<TokioIo<TcpStream>>;

/// A proxy: plain-HTTP requests are sent to it in absolute form, HTTPS ones through a
/// CONNECT tunnel.
#[derive(Clone, Debug)]
struct ProxyRoute {
    uri: Uri,
    to_proxy: HttpsConnector<TcpConnector>,
    tunnel: Tunnel<HttpsConnector<TcpConnector>>,
}

/// The connector behind one shared pointer: hyper's client clones its connector for every
/// request (to connect should no pooled connection be free), and one reference count costs
/// less than the several inside the TLS connector and its route.
#[derive(Clone, Debug)]
struct SharedConnector(Arc<HttpsConnector<RouteConnector>>);

impl tower::Service<Uri> for SharedConnector {
    type Response = MaybeHttpsStream<Stream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        // Only a new connection pays for the copy of the connector itself.
        HttpsConnector::clone(&self.0).call(destination)
    }
}

/// Opens the TCP (or tunnelled) connection for a destination, straight or through the proxy;
/// TLS to the destination is layered on top by `HttpsConnector`.
#[derive(Clone, Debug)]
struct RouteConnector {
    direct: TcpConnector,
    /// Shared rather than inline: hyper's client clones its connector into every request's
    /// future, and a small connector keeps that future small.
    proxy: Option<Arc<ProxyRoute>>,
    /// The destination policy, checked before connecting (by name or written address) and
    /// after (by the address reached).
    guard: Option<Arc<DestinationGuard>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connecting = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

impl tower::Service<Uri> for RouteConnector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let guard = self.guard.clone();
        if let Some(guard) = &guard
            && let Err(refusal) = guard.check_uri(&destination)
        {
            return Box::pin(async move { Err(refusal.into()) });
        }
        match &self.proxy {
            None => {
                let host = destination.host().map(str::to_string);
                let connecting = self.direct.call(destination);
                Box::pin(async move {
                    let stream = connecting.await?;
                    if let Some(guard) = &guard {
                        guard.check_peer(stream.inner(), host.as_deref())?;
                    }
                    Ok(Stream::Direct(stream))
                })
            }
            Some(proxy) if destination.scheme() == Some(&http::uri::Scheme::HTTP) => {
                let connecting = proxy.to_proxy.clone().call(proxy.uri.clone());
                let proxy_host = proxy.uri.host().map(str::to_string);
                Box::pin(async move {
                    let stream = connecting.await?;
                    if let Some(guard) = &guard {
                        guard.check_peer(tcp_of(&stream), proxy_host.as_deref())?;
                    }
                    Ok(Stream::Proxied {
                        stream: Box::new(stream),
                        forwarding: true,
                    })
                })
            }
            Some(proxy) => {
                let connecting = proxy.tunnel.clone().call(destination);
                let proxy_host = proxy.uri.host().map(str::to_string);
                Box::pin(async move {
                    let stream = connecting.await?;
                    if let Some(guard) = &guard {
                        guard.check_peer(tcp_of(&stream), proxy_host.as_deref())?;
                    }
                    Ok(Stream::Proxied {
                        stream: Box::new(stream),
                        forwarding: false,
                    })
                })
            }
        }
    }
}

/// The TCP connection under a connection to a proxy.
fn tcp_of(stream: &ProxyStream) -> &TcpStream {
    match stream {
        MaybeHttpsStream::Http(io) => io.inner(),
        MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner(),
    }
}

/// A connection to the destination, or to the proxy (`forwarding`: requests go in absolute
/// form to the proxy) or through its tunnel.
#[derive(Debug)]
enum Stream {
    Direct(TokioIo<TcpStream>),
    /// Boxed: a TLS stream is far larger than a TCP one, and rarely used.
    Proxied {
        stream: Box<ProxyStream>,
        forwarding: bool,
    },
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            // Without the addresses a TCP stream would add (`HttpInfo`): nothing reads them, and
            // hyper would copy them into every response's extensions, an allocation each.
            Stream::Direct(_) => Connected::new(),
            Stream::Proxied { forwarding, .. } => Connected::new().proxy(*forwarding),
        }
    }
}

impl Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Direct(io) => Pin::new(io).poll_read(cx, buf),
            Stream::Proxied { stream, .. } => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Direct(io) => Pin::new(io).poll_write(cx, buf),
            Stream::Proxied { stream, .. } => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Direct(io) => Pin::new(io).poll_flush(cx),
            Stream::Proxied { stream, .. } => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Direct(io) => Pin::new(io).poll_shutdown(cx),
            Stream::Proxied { stream, .. } => Pin::new(stream).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Direct(io) => io.is_write_vectored(),
            Stream::Proxied { stream, .. } => stream.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Direct(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Stream::Proxied { stream, .. } => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_credentials_are_decoded_into_basic_auth() {
        let proxy = ProxyAddress::parse("http://us%40er:p%3Ass+w@proxy.example:3128").expect("ok");
        assert_eq!(proxy.uri, "http://proxy.example:3128/");
        let auth = proxy.authorization.expect("credentials");
        let token =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "us@er:p:ss+w");
        assert_eq!(auth.to_str().expect("ascii"), format!("Basic {token}"));
        assert!(auth.is_sensitive());
        let plain = ProxyAddress::parse("https://proxy.example").expect("ok");
        assert_eq!(plain.uri, "https://proxy.example:443/");
        assert!(plain.authorization.is_none());
        assert!(ProxyAddress::parse("socks5://proxy.example:1080").is_err());
    }

    /// A request through a client under `policy` for namespace `team-a`.
    async fn send_under(policy: &DestinationPolicy, url: &str) -> Result<u16, bool> {
        let guard = DestinationGuard {
            policy: policy.clone(),
            namespace: Arc::from("team-a"),
        };
        let client = HttpClient::new(&ClientSettings {
            guard: Some(&guard),
            ..ClientSettings::default()
        })
        .expect("client");
        let mut request = Request::new(RequestBody::default());
        *request.uri_mut() = url.parse().expect("uri");
        match client.send(request).await {
            Ok(response) => Ok(response.status().as_u16()),
            Err(e) => Err(is_policy_refusal(&e)),
        }
    }

    #[tokio::test]
    async fn connections_are_checked_after_dns_and_by_the_address_reached() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        // By default a name that resolves to loopback is refused at connect time.
        let deny = DestinationPolicy::default();
        for url in [
            format!("http://localhost:{port}/"),
            format!("http://127.0.0.1:{port}/"),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
        ] {
            assert_eq!(send_under(&deny, &url).await, Err(true), "{url}");
        }
        let open = DestinationPolicy::allowing_loopback();
        assert_eq!(
            send_under(&open, &format!("http://localhost:{port}/")).await,
            Ok(204)
        );
        // Once it is one of Herald's own listeners, it is refused by the address reached.
        open.add_own_listener(SocketAddr::from(([127, 0, 0, 1], port)));
        assert_eq!(
            send_under(&open, &format!("http://localhost:{port}/")).await,
            Err(true)
        );
        // So is a proxy that is.
        let guard = DestinationGuard {
            policy: deny,
            namespace: Arc::from("team-a"),
        };
        let proxied = HttpClient::new(&ClientSettings {
            guard: Some(&guard),
            proxy: Some("http://127.0.0.1:3128"),
            ..ClientSettings::default()
        });
        assert!(matches!(proxied, Err(ClientError::Proxy(_))));
    }

    #[test]
    fn bundles_without_certificates_are_refused() {
        assert!(crate::tls::check_roots(b"").is_err());
        assert!(crate::tls::check_roots(b"not a certificate").is_err());
        assert!(crate::tls::check_identity(b"not a certificate").is_err());
    }
}
